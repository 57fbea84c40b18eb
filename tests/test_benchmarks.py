"""The benchmark scripts run and print what RESULTS.md quotes (smoke: one step, tiny model)."""
import json
import os
import re
import subprocess
import sys

import pytest

from helpers import REPO

_TINY_CONFIG = '''
from pathways_jax.config import base_config

def get_config():
  c = base_config()
  c.data.vocab_size, c.data.seq_len, c.data.batch_size = 256, 32, 4
  c.model.d_model, c.model.num_layers, c.model.num_heads, c.model.num_kv_heads = 32, 2, 2, 1
  c.model.mlp_dim = 64
  c.model.attention = 'cpu'  # as the quickstart
  return c
'''


def _run(tmp_path, script, *args):
  cfg = tmp_path / 'tiny.py'
  cfg.write_text(_TINY_CONFIG)
  out = subprocess.run([sys.executable, os.path.join(REPO, 'benchmarks', script),
                        f'--config={cfg}', *args], capture_output=True, text=True, cwd=REPO,
                       env={**os.environ, 'JAX_PLATFORMS': 'cpu'}, timeout=300, check=False)
  assert out.returncode == 0, out.stderr[-3000:]
  return out.stdout


def test_train_throughput_json_line(tmp_path):
  stdout = _run(tmp_path, 'train_throughput.py', '--no_torch', '--steps=1', '--rounds=1', '--json',
                '--also_query_blocks=1', '--also_attention=xla')
  assert 'attention=cpu, causal_query_blocks=4' in stdout and 'pathways_jax qb=1' in stdout
  assert 'pathways_jax xla' in stdout
  row = json.loads(stdout.strip().splitlines()[-1])
  assert row['num_layers'] == 2 and row['d_model'] == 32 and row['batch_size'] == 4
  assert row['tokens_per_s'] > 0 and 0 < row['mfu'] and row['matmul_peak_flops'] > 0
  assert row['median_tokens_per_s'] > 0 and row['ratio_vs_pytorch_paired_median'] is None
  assert row['attention'] == 'cpu'


def test_paired_ratio_takes_each_rounds_own_ratio():
  """A slow spell that hits both runners in round 3 moves neither the paired median nor the
  quartiles, where the best times of each would pair round 1 with round 2."""
  sys.path.insert(0, os.path.join(REPO, 'benchmarks'))
  import train_throughput  # pylint: disable=g-import-not-at-top
  seconds = {'torch': [2.0, 1.5, 9.0, 2.2, 2.0], 'jax': [1.0, 1.2, 4.5, 1.0, 1.0]}
  assert train_throughput.paired_ratio(seconds, 'torch', 'jax') == (2.0, 2.0, 2.0)
  assert min(seconds['torch']) / min(seconds['jax']) == 1.5


def test_time_rounds_runs_every_runner_once_per_round_in_a_shuffled_order():
  """No runner always runs right after the same one (after PyTorch, XLA starts from an idle pool:
  a fixed order would always charge that to the same runner)."""
  sys.path.insert(0, os.path.join(REPO, 'benchmarks'))
  import train_throughput  # pylint: disable=g-import-not-at-top
  calls = []
  runners = {k: (lambda steps, k=k: calls.append(k)) for k in ('base', 'variant', 'torch')}
  seconds = train_throughput.time_rounds(runners, steps=1, rounds=30)
  rounds = [calls[3 + 3 * i:6 + 3 * i] for i in range(30)]  # after one warm-up call each
  assert all(sorted(r) == ['base', 'torch', 'variant'] for r in rounds)
  after_torch = {r[r.index('torch') + 1] for r in rounds if r.index('torch') < 2}
  assert after_torch == {'base', 'variant'}
  assert all(len(v) == 30 for v in seconds.values())


def test_profile_step_breaks_the_step_down(tmp_path):
  stdout = _run(tmp_path, 'profile_step.py', '--steps=1', '--top=500', '--single_core')
  assert 'ms per step' in stdout
  kinds = {line.split()[0] for line in stdout.splitlines() if line.split()[:1] and
           line.split()[0] in ('matmul', 'kernel', 'elementwise', 'reduce', 'copy', 'other')}
  assert 'matmul' in kinds  # the model's dots were found in the trace and mapped to the HLO
  assert 'kernel' in kinds  # and the 'cpu' attention's custom calls (tuple-shaped outputs)
  # Every op group is listed (--top is larger than their number): both passes of the blocks.
  assert 'fwd Transformer/blocks_*' in stdout and 'bwd Transformer/blocks_*' in stdout


def test_benchmarks_reject_bad_arguments_in_one_line(tmp_path):
  bad_malloc = {'PATHWAYS_HOST_MALLOC': 'no'}
  cases = []
  for script, args, env, message in [
      ('train_throughput.py', ['--config=nope.py', '--no_torch'], {},
       'is not a .py file that exists'),
      ('profile_step.py', ['--config=README.md'], {}, 'is not a .py file that exists'),
      ('profile_step.py', ['--steps=0'], {}, '--steps and --top must be >= 1'),
      ('step_parts.py', ['--rounds=0'], {}, '--steps and --rounds must be >= 1'),
      ('step_parts.py', ['--config=nope.py', '--no_torch'], {}, 'is not a .py file that exists'),
      ('train_throughput.py', ['--no_torch', '--also_query_blocks=x'], {}, 'not a comma-separated'),
      ('train_throughput.py', ['--no_torch', '--also_attention=flash'], {},
       "--also_attention: 'flash' is not one of"),
      ('train_throughput.py', ['--no_torch'], bad_malloc, "PATHWAYS_HOST_MALLOC='no' must be"),
      ('profile_step.py', [], bad_malloc, "PATHWAYS_HOST_MALLOC='no' must be"),
      ('step_parts.py', ['--no_torch'], bad_malloc, "PATHWAYS_HOST_MALLOC='no' must be"),
      ('ab_step.py', ['--variant=x: model.nope=1'], {}, "key 'model.nope': the config has no field"),
      ('ab_step.py', ['--variant=x: model.num_heads=3'], {}, 'is not a multiple of'),
      ('ab_step.py', ['--variant=x model.num_heads=2'], {}, 'is not "NAME: KEY=VALUE'),
      ('ab_step.py', ['--variant=a: train.lr=1', '--variant=a: train.lr=2'], {}, 'names repeat'),
      ('ab_step.py', ['--rounds=0'], {}, '--steps and --rounds must be >= 1'),
      ('diffusion_sampling.py', ['--attention=flash'], {}, "--attention='flash' is not one of"),
      ('rl_step.py', ['--num_generations=1'], {}, 'it needs >= 2'),
      ('rl_step.py', ['--max_new_tokens=0'], {}, '--max_new_tokens must be >= 1'),
      ('rl_step.py', ['--num_heads=3'], {}, 'must be a multiple of --num_heads=3'),
      ('rl_step.py', ['--attention=flash'], {}, "--attention='flash' is not one of")]:
    cases.append((script, args, env, message))
  # One interpreter runs every case as `python SCRIPT ARGS` would (runpy, __main__), so the heavy
  # imports are paid once; each case reports its exit code and stderr.
  out = subprocess.run([sys.executable, '-c', _RUN_AS_MAIN, json.dumps(cases)],
                       capture_output=True, text=True, cwd=REPO, timeout=300, check=False)
  assert out.returncode == 0, out.stderr[-3000:]
  for (script, _, _, message), (code, stderr) in zip(cases, json.loads(out.stdout.splitlines()[-1])):
    assert code == 2 and message in stderr and 'Traceback' not in stderr, (script, stderr[-2000:])


_RUN_AS_MAIN = r'''
import contextlib, io, json, os, runpy, sys, traceback
results = []
sys.path.insert(0, os.path.join(os.getcwd(), 'benchmarks'))
for script, args, env, _ in json.loads(sys.argv[1]):
  saved_env, saved_argv, err = dict(os.environ), sys.argv, io.StringIO()
  os.environ.update(env)
  sys.argv = [os.path.join('benchmarks', script), *args]
  if 'pathways_jax.host_memory' in sys.modules:  # its once-per-process setting, as if fresh
    sys.modules['pathways_jax.host_memory']._enabled = False
  code = 0
  with contextlib.redirect_stderr(err):
    try:
      runpy.run_path(sys.argv[0], run_name='__main__')
    except SystemExit as e:
      code = e.code if isinstance(e.code, int) else 1
    except BaseException:  # what `python SCRIPT` would print
      traceback.print_exc()
      code = 1
  os.environ.clear()
  os.environ.update(saved_env)
  sys.argv = saved_argv
  results.append((code, err.getvalue()))
print(json.dumps(results))
'''


def test_step_parts_times_the_step_without_attention_and_without_the_mlp(tmp_path):
  stdout = _run(tmp_path, 'step_parts.py', '--no_torch', '--steps=1', '--rounds=1')
  rows = {line[:14].strip(): line[14:].split() for line in stdout.splitlines()[2:5]}
  assert set(rows) == {'full', 'no attention', 'no MLP'}, stdout
  for cells in rows.values():  # 'best / median' for pathways_jax alone
    assert len(cells) == 3 and float(cells[0]) > 0 and float(cells[2]) > 0, stdout
  assert 'cost of attention' in stdout and 'cost of MLP' in stdout
  # The variants really are different programs: each leaves out its part's matmuls.
  dots = dict(re.findall(r'(full|no attention|no MLP) (\d+)', stdout.split('custom-call ops')[1]))
  assert int(dots['full']) > int(dots['no attention']) and int(dots['full']) > int(dots['no MLP'])


def test_ab_step_times_config_and_compiler_option_variants_against_the_baseline(tmp_path):
  stdout = _run(tmp_path, 'ab_step.py', '--rounds=2',
                '--variant=qb1: model.causal_query_blocks=1',
                '--variant=conc: xla.xla_cpu_enable_concurrency_optimized_scheduler=true')
  assert '  qb1: model.causal_query_blocks=1' in stdout
  assert '  conc: xla.xla_cpu_enable_concurrency_optimized_scheduler=True' in stdout
  rows = {line.split()[0]: line.split()[1:] for line in stdout.splitlines()
          if line.split()[:1] and line.split()[0] in ('base', 'qb1', 'conc')}
  assert set(rows) == {'base', 'qb1', 'conc'}, stdout
  assert rows['base'][2:] == ['1.000', '[1.000-1.000]']  # the baseline against itself
  for cells in rows.values():  # best ms, median ms, paired median, [quartiles]
    assert float(cells[0]) > 0 and float(cells[1]) > 0 and float(cells[2]) > 0, stdout


def test_ab_step_rejects_a_compiler_option_xla_does_not_know(tmp_path):
  cfg = tmp_path / 'tiny.py'
  cfg.write_text(_TINY_CONFIG)
  out = subprocess.run([sys.executable, os.path.join(REPO, 'benchmarks', 'ab_step.py'),
                        f'--config={cfg}', '--variant=x: xla.no_such_option=1'],
                       capture_output=True, text=True, cwd=REPO, timeout=300, check=False,
                       env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  assert out.returncode == 2 and "--variant 'x' does not compile" in out.stderr
  assert 'no_such_option' in out.stderr and 'Traceback' not in out.stderr, out.stderr[-2000:]


def test_ab_step_variants_change_a_copy_of_the_config_with_typed_values():
  sys.path.insert(0, os.path.join(REPO, 'benchmarks'))
  import ab_step  # pylint: disable=g-import-not-at-top
  from pathways_jax.config import base_config  # pylint: disable=g-import-not-at-top
  name, overrides, options = ab_step.parse_variant(
      'v: model.causal_query_blocks=1 train.lr=2e-3 xla.xla_cpu_scheduler_type=X xla.n=3')
  assert name == 'v' and options == {'xla_cpu_scheduler_type': 'X', 'n': 3}
  cfg = base_config()
  before = cfg.model.causal_query_blocks
  got = ab_step.apply_overrides(cfg, overrides, name)
  assert got.model.causal_query_blocks == 1 and isinstance(got.model.causal_query_blocks, int)
  assert got.train.lr == 2e-3 and cfg.model.causal_query_blocks == before


def test_ab_step_takes_model_code_from_another_checkout_for_its_variant_only(tmp_path):
  sys.path.insert(0, os.path.join(REPO, 'benchmarks'))
  import ab_step  # pylint: disable=g-import-not-at-top
  from pathways_jax.models import attention  # pylint: disable=g-import-not-at-top
  models = tmp_path / 'pathways_jax' / 'models'
  models.mkdir(parents=True)
  (models / 'attention.py').write_text('def apply_rope(x, cos, sin):\n  return "old"\n')
  _, overrides, _ = ab_step.parse_variant(
      f'old: code.pathways_jax.models.attention.apply_rope={tmp_path} train.lr=1e-3')
  swaps = ab_step.take_code_swaps(overrides, 'old')
  assert overrides == {'train.lr': '1e-3'}  # what apply_overrides then takes
  current = attention.apply_rope
  with ab_step.swapped(swaps):
    assert attention.apply_rope(None, None, None) == 'old'
  assert attention.apply_rope is current
  with pytest.raises(ab_step.VariantError, match='no file'):
    ab_step.take_code_swaps({'code.pathways_jax.models.nope.f': str(tmp_path)}, 'x')
  with pytest.raises(ab_step.VariantError, match="'rope' is not in both"):
    ab_step.take_code_swaps({'code.pathways_jax.models.attention.rope': str(tmp_path)}, 'x')


def test_multi_lora_prints_every_variant_against_the_merged_model(tmp_path):
  stdout = _run(tmp_path, 'multi_lora.py', '--batch=4', '--new_tokens=4', '--adapters=2',
                '--rank=2', '--repeats=1')
  rows = [l for l in stdout.splitlines() if l.startswith('| ') and 'x (' in l]
  assert [r.split(' | ')[0] for r in rows] == ['| merged (one model)',
                                               '| multi-LoRA, 2 adapters mixed',
                                               '| one unmerged adapter'], stdout
  assert rows[0].split(' | ')[3].startswith('1.00x'), stdout


def test_sft_vs_trl_times_the_sft_step_and_tables_lora_against_full_memory(tmp_path):
  """Tiny sizes. The pathways_jax side and the memory table always run (~20 s); the TRL side
  where the torch venv with trl exists (`make golden-hf`; CI has no torch; ~a minute more)."""
  golden = os.path.join(REPO, '.venv-golden', 'bin', 'python')
  has_trl = os.path.isfile(golden) and subprocess.run(
      [golden, '-c', 'import torch, transformers, trl'], capture_output=True, check=False,
      timeout=300).returncode == 0
  args = ['--rounds=1', '--seq_len=128', '--batch_size=2', '--d_model=32', '--num_layers=1',
          '--num_heads=2', '--num_kv_heads=1', '--mlp_dim=64', '--vocab=384', '--num_people=8',
          '--max_turns=1', '--conversations=24', f'--workdir={tmp_path}', '--json',
          *([] if has_trl else ['--no_torch'])]
  out = subprocess.run([sys.executable, os.path.join(REPO, 'benchmarks', 'sft_vs_trl.py'), *args],
                       capture_output=True, text=True, cwd=REPO, timeout=600, check=False,
                       env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  assert out.returncode == 0, out.stderr[-3000:]
  result = json.loads(out.stdout.strip().splitlines()[-1])
  jax_row = result['rows']['pathways_jax']
  assert jax_row['tokens_per_s'] > 0 and 0 < jax_row['real_per_step'] <= jax_row['slots_per_step']
  assert jax_row['slots_per_step'] == 2 * 128 and result['jax_data']['conversations'] == 24
  full, lora = result['memory']['full'], result['memory']['lora_r8']
  assert full['trainable'] == full['params'] and lora['params'] > full['params']
  assert lora['trainable'] == lora['params'] - full['params']  # the adapters alone are trained
  # Adam keeps two f32 moments per trained param (and a few scalars): the optimizer state shrinks
  # by the trainable-parameter ratio.
  assert 8 * full['trainable'] <= full['opt_state_bytes'] < 8 * full['trainable'] + 1024
  assert abs(lora['opt_state_bytes'] / full['opt_state_bytes']
             - lora['trainable'] / full['trainable']) < 0.01
  assert lora['output_bytes'] < full['output_bytes']  # the step returns the adapters' state only
  assert 'LoRA r=8' in out.stdout and 'full fine-tuning' in out.stdout
  if has_trl:
    assert set(result['rows']) == {'pathways_jax', 'trl padding_free', 'trl rows'}
    # The same conversations, rendered and masked alike by both sides.
    assert (result['trl']['tokens'], result['trl']['trained_tokens']) == (
        result['jax_data']['tokens'], result['jax_data']['trained_tokens'])
    assert all(r['best'] > 0 for r in result['ratios'].values()), result['ratios']
    # Both TRL variants keep conversations apart and draw the same batches: the same loss.
    rows = result['rows']
    assert abs(rows['trl padding_free']['loss'] - rows['trl rows']['loss']) < 1e-3, rows


def test_preference_vs_trl_pairs_and_the_batch_that_fills_its_rows():
  """The inputs both sides of benchmarks/preference_vs_trl.py train on (no step is compiled:
  `make bench-preference` runs the rest): pairs whose two answers differ in the same format, and
  the batch, the most leading pairs that pack into exactly the asked number of rows."""
  sys.path.insert(0, os.path.join(REPO, 'benchmarks'))
  import preference_vs_trl  # pylint: disable=g-import-not-at-top
  from pathways_jax.data import preference  # pylint: disable=g-import-not-at-top
  records = preference_vs_trl.make_pairs(num_people=8, max_turns=3)
  assert len(records) > 100
  for r in records:
    assert r['prompt'][0]['role'] == 'system' and r['prompt'][-1]['role'] == 'user'
    assert [m['role'] for m in r['chosen'] + r['rejected']] == ['assistant', 'assistant']
    assert r['chosen'][0]['content'] != r['rejected'][0]['content']
  assert max(len(r['prompt']) for r in records) == 1 + 2 * 2 + 1  # up to two earlier turns
  tok = preference_vs_trl.train_tokenizer(
      [r['prompt'] + r['chosen'] + r['rejected'] for r in records], 384)
  rendered = [preference.render_pair(tok, r['prompt'], r['chosen'], r['rejected'])
              for r in records[:40]]
  n = preference_vs_trl.choose_batch(rendered, 256, 3, tok.pad_id)
  rows = lambda k: preference.build_rows(rendered[:k], 256, pad_id=tok.pad_id)[1]['rows']
  assert rows(n) == 3 and rows(n + 1) > 3


def test_rl_step_renders_the_same_prompts_for_both_sides_and_a_grpo_task_takes_its_config(
    tmp_path):
  """The inputs of benchmarks/rl_step.py (no rollout or step is compiled: `make bench-rl` runs
  them): the TRL file's prompts and the pathways_jax file's read back as the same messages, the
  prompt budget is the longest prompt, and task 'grpo' accepts the run config, its step's rows
  [P*G, prompt + new tokens]."""
  import argparse  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, os.path.join(REPO, 'benchmarks'))
  import rl_step  # pylint: disable=g-import-not-at-top
  from pathways_jax import tasks  # pylint: disable=g-import-not-at-top
  from pathways_jax.interop.hf import run_dir  # pylint: disable=g-import-not-at-top
  from pathways_jax.models.transformer import Transformer  # pylint: disable=g-import-not-at-top
  from pathways_jax.rl import prompts as prompts_lib  # pylint: disable=g-import-not-at-top
  args = argparse.Namespace(num_people=8, prompts=3, seed=0, vocab=384, max_new_tokens=8,
                            d_model=32, num_layers=1, num_heads=2, num_kv_heads=1, mlp_dim=64,
                            num_generations=4, lr=1e-4, attention='cpu')
  data, hf_dir, facts = rl_step.prepare(args, str(tmp_path))
  trl_prompts = [json.loads(line)['prompt'] for line in open(data['trl'], encoding='utf-8')]
  jax_read = prompts_lib.read_prompts(data['jax'])
  assert [m for _, m in jax_read] == trl_prompts and len(trl_prompts) == 3
  assert [m['role'] for m in trl_prompts[0]] == ['system', 'user']
  assert facts['prompt_width'] == max(facts['prompt_tokens']) == max(map(len, facts['prompt_ids']))
  cfg = rl_step.run_config(args, hf_dir, data['jax'], facts['prompt_width'])
  cfg.rl.rewards = 'correct'  # the benchmark's own reward is registered when it runs
  task = tasks.make(cfg, Transformer(run_dir.init_model_config(hf_dir, cfg.model)))
  spec = task.batch_spec(cfg.data.batch_size, cfg.data.seq_len)
  assert spec['tokens'].shape == (3 * 4, facts['prompt_width'] + 8)
  assert rl_step.space_share('a b c') == 0.4 and rl_step.space_share('') == 0.0
