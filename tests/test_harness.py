"""The lm-evaluation-harness model (pathways_jax.eval.harness) and CLI (pathways_jax.evaluate) on
the local tasks of tests/harness_tasks (their JSONL is read beside the YAML: nothing downloads),
with tiny random-init run directories, AR and LLaDA.

Every per-sample number the harness reports is recomputed here without it: AR log-likelihoods by
one plain model.apply per request and log_softmax; LLaDA's by objectives.diffusion.log_likelihood
(the project's estimator, same key and sample counts) and LLaDA's suffix greedy check written out
as a plain loop; generations by greedy decoding written out as a loop (AR) or the LLaDA sampler
called directly, then cut at the stop strings.
"""
import functools
import json
import os

os.environ.setdefault('HF_DATASETS_OFFLINE', '1')  # before `datasets` is imported: never download
os.environ.setdefault('HF_HUB_OFFLINE', '1')
# pylint: disable=wrong-import-position

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

lm_eval = pytest.importorskip('lm_eval')
from lm_eval.api.instance import Instance
from lm_eval.tasks import TaskManager
from lm_eval import utils as lm_utils

from helpers import REPO, cli, tiny_config
from pathways_jax import config as config_lib
from pathways_jax.eval import harness
from pathways_jax.models.transformer import Transformer
from pathways_jax.objectives import diffusion as diffusion_obj
from pathways_jax.sampling import diffusion

TASKS_DIR = os.path.join(REPO, 'tests', 'harness_tasks')
TASKS = ['pathways_mc', 'pathways_ll', 'pathways_gen']
BOS, EOS, MASK, SPECIALS = 1, 2, 3, 4  # the byte tokenizer: id = byte + 4
MAX_LEN = 64
MC = dict(mc_num=8, mc_batch_size=4)  # small: LLaDA's own evaluations use 128 samples
GEN_TOKS = 12  # pathways_gen.yaml's max_gen_toks


def make_run(path, *, causal: bool, seed: int = 0, **overrides):
  """A run directory (config.json + params as checkpoint 0) of a random tiny model. Weights are
  N(0, 0.2^2) (norm scales 1), drawn in numpy for the shapes model.init would give (tracing
  only; compiling init takes seconds): larger than the usual init, so that the logits are far
  from flat and greedy choices have clear margins, not decided by float rounding."""
  cfg = tiny_config(str(path) + '_cache', **{
      'model.causal': causal, 'objective': 'autoregressive' if causal else 'diffusion',
      'model.max_len': MAX_LEN, **overrides})
  model = Transformer(config_lib.ModelConfig.from_config(cfg.model, vocab_size=cfg.model.get(
      'vocab_size') or 260))
  shapes = nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0),
                                        jnp.zeros((1, 8), jnp.int32))['params'])
  rng = np.random.default_rng(seed)
  params = jax.tree_util.tree_map_with_path(
      lambda path, x: (np.ones(x.shape, x.dtype) if 'scale' in jax.tree_util.keystr(path) else
                       (0.2 * rng.standard_normal(x.shape)).astype(x.dtype)), shapes)
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, 'config.json'), 'w') as f:
    f.write(cfg.to_json_best_effort(indent=2))
  ocp.PyTreeCheckpointer().save(os.path.join(path, 'checkpoints', '0', 'state'), {'params': params})
  return str(path), model, jax.tree.map(jnp.asarray, params)


def enc(text: str) -> list[int]:
  return [b + SPECIALS for b in text.encode('utf-8')]


def split_pair(context: str, continuation: str) -> tuple[list[int], list[int]]:
  """Token ids of a (context, continuation) request as the harness defines them: trailing spaces
  of the context belong to the continuation; BOS starts the text; an empty context is BOS."""
  n = len(context) - len(context.rstrip())
  if n:
    context, continuation = context[:-n], context[-n:] + continuation
  return [BOS] + enc(context), enc(continuation)


@functools.cache
def forward(model):
  """Plain logits of one model (jitted: unjitted Flax compiles every op for every new length)."""
  return jax.jit(lambda params, tokens_BL: model.apply({'params': params}, tokens_BL))


def direct_ar(model, params, context_ids, continuation_ids):
  """Sum of log p(continuation | context) and greedy match by one plain forward pass (the
  sequence cut on the left to max_len + 1 tokens). The row is filled up to max_len with zeros
  after its end, which a causal model's earlier positions cannot see: one compiled shape for every
  request, and no segment ids or batching as the harness uses."""
  whole = (context_ids + continuation_ids)[-(MAX_LEN + 1):]
  row = np.zeros((1, MAX_LEN), np.int32)
  row[0, :len(whole) - 1] = whole[:-1]
  logits = forward(model)(params, row)[0]
  logp = np.asarray(jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1), np.float64)
  span = range(len(whole) - 1 - len(continuation_ids), len(whole) - 1)
  return (sum(logp[j, whole[j + 1]] for j in span),
          all(int(np.argmax(logp[j])) == whole[j + 1] for j in span))


def ar_greedy(model, params, ids, n):
  """n greedy tokens after `ids`, one plain forward pass each (as in direct_ar)."""
  new = []
  while len(new) < n and EOS not in new:
    row = np.zeros((1, MAX_LEN), np.int32)
    row[0, :len(ids) + len(new)] = ids + new
    new.append(int(np.argmax(forward(model)(params, row)[0, len(ids) + len(new) - 1])))
  return new


def direct_llada_greedy(model, params, prompt, answer):
  """LLaDA's eval_llada.py suffix_greedy_prediction: the answer masked, one token per step (the
  most confident masked position takes its argmax)."""
  x = np.asarray(prompt + [MASK] * len(answer), np.int32)
  fwd = forward(model)
  for _ in answer:
    masked = np.flatnonzero(x == MASK)
    logits = np.asarray(fwd(params, x[None])[0], np.float32)[masked]
    pred = logits.argmax(-1)
    conf = np.asarray(jax.nn.softmax(jnp.asarray(logits), -1))[np.arange(len(masked)), pred]
    best = int(np.argmax(conf))
    x[masked[best]] = pred[best]
  return x[len(prompt):].tolist() == list(answer)


def samples(results, task):
  return sorted(results['samples'][task], key=lambda s: s['doc_id'])


def run_harness(lm, tasks, **kw):
  tm = TaskManager(include_path=TASKS_DIR, include_defaults=False)
  return lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=tm, log_samples=True,
                                 bootstrap_iters=0, **kw)


@pytest.fixture(scope='module')
def ar_run(tmp_path_factory):
  workdir, model, params = make_run(tmp_path_factory.mktemp('harness') / 'ar', causal=True)
  return dict(workdir=workdir, model=model, params=params)


@pytest.fixture(scope='module')
def ar(ar_run):
  lm = harness.PathwaysLM(workdir=ar_run['workdir'], batch_size=4)
  return dict(ar_run, lm=lm, results=run_harness(lm, TASKS + ['pathways_rolling']))


@pytest.fixture(scope='module')
def llada(tmp_path_factory):
  workdir, model, params = make_run(tmp_path_factory.mktemp('harness') / 'llada', causal=False)
  lm = harness.PathwaysLM(workdir=workdir, batch_size=8, **MC)
  return dict(workdir=workdir, model=model, params=params, lm=lm, results=run_harness(lm, TASKS))


def test_ar_loglikelihoods_equal_a_direct_computation(ar):
  """Multiple choice and plain continuations (one with an empty context, one cut on the left to
  max_len): the harness's numbers, batched and padded to buckets, are the unpadded ones."""
  checked = 0
  for task in ('pathways_mc', 'pathways_ll'):
    for s in samples(ar['results'], task):
      for (context, continuation), ((logp, greedy),) in zip(s['arguments'], s['resps']):
        want_logp, want_greedy = direct_ar(ar['model'], ar['params'],
                                           *split_pair(context, continuation))
        np.testing.assert_allclose(logp, want_logp, rtol=1e-5, atol=1e-4)
        assert greedy == want_greedy
        checked += 1
  assert checked == 12 + 4
  long_context = samples(ar['results'], 'pathways_ll')[-1]['arguments'][0][0]
  assert len(enc(long_context)) > MAX_LEN  # the truncation path ran
  # The metric is computed from those numbers: acc is the argmax choice being the answer.
  mc = samples(ar['results'], 'pathways_mc')
  acc = np.mean([np.argmax([r[0][0] for r in s['resps']]) == s['target'] for s in mc])
  assert ar['results']['results']['pathways_mc']['acc,none'] == pytest.approx(acc)


def test_ar_is_greedy_when_the_continuation_is_the_greedy_one(ar):
  model, params, lm = ar['model'], ar['params'], ar['lm']
  context = [BOS] + enc('def f(x):')
  greedy = ar_greedy(model, params, context, 4)
  assert len(greedy) == 4 and EOS not in greedy
  other = greedy[:-1] + [(greedy[-1] + 1 - SPECIALS) % 256 + SPECIALS]
  got = lm._loglikelihood_tokens([(None, context, greedy), (None, context, other)])  # pylint: disable=protected-access
  assert [g for _, g in got] == [True, False]
  np.testing.assert_allclose(got[0][0], direct_ar(model, params, context, greedy)[0], rtol=1e-5,
                             atol=1e-4)


def test_ar_rolling_loglikelihood_sums_the_windows(ar):
  """Whole-text log-likelihoods (perplexity tasks): the second text spans several max_len windows,
  each scored given as much context as fits (the harness's rolling windows)."""
  model, params = ar['model'], ar['params']
  got = samples(ar['results'], 'pathways_rolling')
  assert len(enc(got[-1]['arguments'][0][0])) > 2 * MAX_LEN
  for s in got:
    (text,) = s['arguments'][0]
    want = 0.0
    for context, continuation in map(lm_utils.make_disjoint_window,
                                     lm_utils.get_rolling_token_windows(enc(text), BOS, MAX_LEN,
                                                                        1)):
      want += direct_ar(model, params, context, continuation)[0]
    np.testing.assert_allclose(s['resps'][0][0], want, rtol=1e-5, atol=1e-3)


def test_ar_generate_until_is_the_greedy_sampler_cut_at_the_stop_string(ar):
  """The harness's text (batched, left-padded prompts, the KV-cache sampler) is greedy decoding
  written out as a plain loop of full forward passes, up to EOS, decoded, cut at the first stop
  string, at most max_gen_toks tokens."""
  model, params, lm = ar['model'], ar['params'], ar['lm']

  def direct(prompt):  # 16 greedy tokens, up to EOS
    new = ar_greedy(model, params, [BOS] + enc(prompt), 16)
    return new[:new.index(EOS)] if EOS in new else new

  def decode(ids):
    return bytes(i - SPECIALS for i in ids if i >= SPECIALS).decode('utf-8', errors='replace')

  for s in samples(ar['results'], 'pathways_gen'):
    context, _ = s['arguments'][0]
    assert s['resps'][0][0] == decode(direct(context)[:GEN_TOKS]).split('\n')[0]
  # A stop string from the middle of the free-running text cuts it there (the same shapes as
  # the task's requests, so nothing new compiles).
  prompt = 'Q: Who wrote the first program?\nA:'
  full = decode(direct(prompt)[:GEN_TOKS])
  assert len(full) >= 6, full
  stop = full[len(full) // 2:len(full) // 2 + 2]
  requests = [Instance('generate_until', {}, (prompt, {'until': [stop], 'max_gen_toks': GEN_TOKS}),
                       0),
              Instance('generate_until', {}, (prompt, {'until': [], 'max_new_tokens': GEN_TOKS}),
                       1)]
  cut, whole = lm.generate_until(requests)
  assert cut == full.split(stop)[0] and len(cut) <= len(full) // 2 and stop not in cut
  assert whole == full


def test_llada_loglikelihoods_equal_the_projects_estimator(llada):
  """The harness pads rows to buckets and packs several requests per forward pass; its numbers
  are those of diffusion.log_likelihood with the same key and sample counts, and is_greedy is
  LLaDA's suffix greedy check."""
  model, params = llada['model'], llada['params']
  key = jax.random.key(0)
  checked = 0
  # The plain, empty-context and left-cut continuations, and one question's choices (of one
  # length: each (prompt, answer) length compiles the estimator once).
  for task, docs in (('pathways_ll', (0, 1, 3)), ('pathways_mc', (0,))):
    for s in [samples(llada['results'], task)[d] for d in docs]:
      for (context, continuation), ((logp, greedy),) in zip(s['arguments'], s['resps']):
        prompt, answer = split_pair(context, continuation)
        prompt = prompt[-(MAX_LEN - len(answer)):]
        want = diffusion_obj.log_likelihood(model, params, np.asarray(prompt),
                                            np.asarray(answer), mask_id=MASK, key=key,
                                            mc_num=MC['mc_num'], batch_size=MC['mc_batch_size'])
        np.testing.assert_allclose(logp, want, rtol=1e-5, atol=1e-3)
        assert greedy is False  # a random model's greedy answer is not the text's (see below)
        checked += 1
  assert checked == 3 + 3
  mc = samples(llada['results'], 'pathways_mc')
  acc = np.mean([np.argmax([r[0][0] for r in s['resps']]) == s['target'] for s in mc])
  assert llada['results']['results']['pathways_mc']['acc,none'] == pytest.approx(acc)


def test_llada_is_greedy_and_rolling(llada):
  model, params, lm = llada['model'], llada['params'], llada['lm']
  prompt = [BOS] + enc('x = 1')
  # The answer LLaDA's greedy check would produce, found by the same plain loop with a fixed
  # length: that answer passes, and another one does not.
  x = np.asarray(prompt + [MASK] * 3, np.int32)
  fwd = forward(model)
  for _ in range(3):
    masked = np.flatnonzero(x == MASK)
    logits = np.asarray(fwd(params, x[None])[0], np.float32)[masked]
    best = int(np.argmax(np.max(np.asarray(jax.nn.softmax(jnp.asarray(logits), -1)), -1)))
    x[masked[best]] = logits[best].argmax()
  answer = x[len(prompt):].tolist()
  assert direct_llada_greedy(model, params, prompt, answer)
  other = answer[:2] + [(answer[2] + 1 - SPECIALS) % 256 + SPECIALS]
  got = lm._loglikelihood_tokens([(None, prompt, answer), (None, prompt, other)])  # pylint: disable=protected-access
  assert [g for _, g in got] == [True, False]
  with pytest.raises(NotImplementedError, match='LLaDA'):
    lm.loglikelihood_rolling([Instance('loglikelihood_rolling', {}, ('some text',), 0)])


def test_llada_generate_until_is_the_diffusion_sampler_cut_at_the_stop_string(llada):
  model, params = llada['model'], llada['params']
  for s in samples(llada['results'], 'pathways_gen'):
    context, _ = s['arguments'][0]
    ids = [BOS] + enc(context)
    out = diffusion.generate(model, params, np.asarray([ids], np.int32), mask_id=MASK,
                             key=jax.random.key(0), gen_length=GEN_TOKS, steps=GEN_TOKS,
                             block_length=GEN_TOKS)
    new = [int(t) for t in np.asarray(out)[0, len(ids):]]
    new = new[:new.index(EOS)] if EOS in new else new
    text = bytes(i - SPECIALS for i in new if i >= SPECIALS).decode('utf-8', errors='replace')
    assert s['resps'][0][0] == text.split('\n')[0]


def test_chat_template_through_the_tokenizer(tmp_path):
  from test_hf_tokenizer import build_tokenizer  # pylint: disable=g-import-not-at-top
  from pathways_jax.data import hf_tokenizer  # pylint: disable=g-import-not-at-top
  tok_dir = build_tokenizer(tmp_path / 'tok')
  tok = hf_tokenizer.HFTokenizer.from_path(tok_dir)
  workdir, _, _ = make_run(tmp_path / 'chat', causal=True, **{
      'data.tokenizer': 'hf', 'data.tokenizer_path': str(tok_dir),
      'model.vocab_size': tok.vocab_size})
  lm = harness.PathwaysLM(workdir=workdir, batch_size=2)
  chat = [{'role': 'user', 'content': 'What is 2 + 3?'}]
  assert lm.apply_chat_template(chat) == tok.render_chat(chat, add_generation_prompt=True)
  # Without a generation prompt the last message is continued: no end of turn after it.
  prefill = chat + [{'role': 'assistant', 'content': 'It is'}]
  assert lm.apply_chat_template(prefill, add_generation_prompt=False) == (
      '<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\nIt is')
  assert lm.chat_template(True) == tok.chat_template and lm.tokenizer_name
  assert lm.tok_encode('Hi')[0] == tok.bos_id
  assert lm.tok_encode(tok.render_chat(chat))[0] == tok.bos_id
  assert lm.tok_encode('<s>Hi').count(tok.bos_id) == 1  # a BOS already in the text is not doubled
  results = run_harness(lm, ['pathways_gen'], limit=1, apply_chat_template=True,
                        gen_kwargs={'max_gen_toks': 4})
  (context, _), = samples(results, 'pathways_gen')[0]['arguments']
  assert context == tok.render_chat([{'role': 'user', 'content': 'Q: What is 2 + 3?\nA:'}],
                                    add_generation_prompt=True)


def test_bucket_lengths():
  assert harness.bucket_lengths(64) == (32, 64)
  assert harness.bucket_lengths(100, 16) == (16, 32, 64, 100)
  assert harness.bucket_lengths(32) == (32,)


def test_the_cli_prints_the_table_and_writes_the_json(ar_run, tmp_path):
  out = tmp_path / 'results.json'
  proc = cli('pathways_jax.evaluate', f'--workdir={ar_run["workdir"]}', '--tasks=pathways_mc',
             f'--include_path={TASKS_DIR}', '--limit=2', '--batch_size=4', f'--output={out}',
             '--log_samples', env={'HF_DATASETS_OFFLINE': '1', 'HF_HUB_OFFLINE': '1'})
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'pathways_mc' in proc.stdout and '|acc' in proc.stdout.replace(' ', '')
  results = json.loads(out.read_text())
  assert results['n-samples']['pathways_mc']['effective'] == 2
  assert results['config']['pathways_model'] == 'AR' and results['config']['pathways_step'] == 0
  mc = sorted(results['samples']['pathways_mc'], key=lambda s: s['doc_id'])
  acc = np.mean([np.argmax([r[0][0] for r in s['resps']]) == s['target'] for s in mc])
  assert results['results']['pathways_mc']['acc,none'] == pytest.approx(acc)


def test_cli_bad_input_is_one_clear_line(tmp_path):
  proc = cli('pathways_jax.evaluate', f'--workdir={tmp_path / "nothing"}', '--tasks=pathways_mc',
             f'--include_path={TASKS_DIR}', env={'HF_DATASETS_OFFLINE': '1'})
  assert proc.returncode == 1, proc.stderr[-2000:]
  assert proc.stderr.strip().splitlines()[-1].startswith('error:'), proc.stderr[-2000:]
