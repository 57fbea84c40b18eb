"""experiments/arithmetic_recall.py: the teacher-forced probe reads the answer where each model
family predicts it (the next position for AR; the masked position itself for LLaDA, also with
model.shift_logits, which the model applies itself), and only there."""
import numpy as np
import pytest

from helpers import experiment_module, tiny_config
from pathways_jax import config as config_lib
from pathways_jax.data import synthetic, tokenizers

recall = experiment_module('arithmetic_recall')


class Oracle:
  """Logits one-hot on the true line (its params hold them all): at the next position's token for
  a causal model, at the position's own for LLaDA (with shift_logits too: Transformer moves its
  head so that position i reads token i), whatever it is shown."""

  def __init__(self, causal, shift=False):
    self.cfg = config_lib.ModelConfig(causal=causal, shift_logits=shift, vocab_size=264)

  def apply(self, variables, inputs_BL, segment_ids_BL=None):
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    truth_NL = jnp.asarray(variables['params'])  # every line; each batch row is the line it matches best
    truth_BL = truth_NL[jnp.argmax((inputs_BL[:, None] == truth_NL[None]).sum(-1), axis=1)]
    if self.cfg.causal:
      truth_BL = jnp.concatenate([truth_BL[:, 1:], truth_BL[:, :1]], axis=1)
    return jnp.eye(264)[truth_BL] + 0.0 * inputs_BL[..., None]


@pytest.fixture(scope='module')
def rows():
  tok = tokenizers.ByteTokenizer()
  lines = [('54 + 48', '102'), ('3 * 4', '12'), ('9 - 9', '0')]
  rows_N2L, answer_NL, keep = recall.answer_rows(tok, recall.line_items(lines), 32)
  assert keep == [True] * 3
  for (p, r), row, ans in zip(lines, rows_N2L, answer_NL):
    assert tok.decode(row[0][ans]) == f' {r}' or tok.decode(row[0][ans]) == r
    assert tok.decode(row[0][row[1] == 1][1:]) == f'{p} = {r}'  # bos, the line; padding after
  return tok, rows_N2L, answer_NL


@pytest.mark.parametrize('causal,shift', [(True, False), (False, False), (False, True)])
def test_the_probe_reads_each_family_where_it_predicts(tmp_path, rows, causal, shift):
  tok, rows_N2L, answer_NL = rows
  cfg = tiny_config(str(tmp_path))
  cfg.data.mask_id = tok.mask_id
  truth = rows_N2L[:, 0].copy()
  model = Oracle(causal, shift)
  assert recall.recalled(cfg, model, truth, rows_N2L, answer_NL, batch=2).tolist() == [True] * 3
  assert recall.recalled(cfg, model, truth, rows_N2L, answer_NL, batch=4).tolist() == [True] * 3
  wrong = truth.copy()
  wrong[0, np.flatnonzero(answer_NL[0])[-1]] += 1  # the last answer token of line 0
  wrong[1, 1] += 1  # a prompt token of line 1: not an answer token, so no matter
  assert recall.recalled(cfg, model, wrong, rows_N2L, answer_NL, batch=2).tolist() == [
      False, True, True]


def test_unread_problems_are_of_the_corpus_distribution_and_not_read():
  read = {'3 * 4', '54 + 48'}
  got = recall.unread_problems(read, 50)
  assert len(got) == 50 and len({p for p, _ in got}) == 50 and not read & {p for p, _ in got}
  assert all(str(eval(p)) == r for p, r in got)  # pylint: disable=eval-used
  assert {p.split()[1] for p, _ in got} == {'+', '-', '*'}
  data = tiny_config('unused').data
  lines = recall.worked_lines(data, 'train')
  assert {p for p, _ in lines} == synthetic.arithmetic_problems(data.synthetic, 0, 'train')


def test_llada_is_shown_masks_where_the_answer_is(tmp_path, rows):
  """A LLaDA model that copies its input recalls nothing: the answer is hidden from it."""
  tok, rows_N2L, answer_NL = rows
  cfg = tiny_config(str(tmp_path))
  cfg.data.mask_id = tok.mask_id

  class Copier(Oracle):
    def apply(self, variables, inputs_BL, segment_ids_BL=None):
      import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
      return jnp.eye(264)[inputs_BL]

  got = recall.recalled(cfg, Copier(False), None, rows_N2L, answer_NL, batch=2)
  assert got.tolist() == [False] * 3


@pytest.mark.parametrize('shift', [False, True])
def test_confidence_unmasking_fills_one_token_per_pass_the_surest_first(tmp_path, rows, shift):
  """A LLaDA stand-in that knows an answer token only once the token before it is shown (and
  is then surer than anywhere else) recalls every line one token per pass, and none in one pass
  (each answer here has two tokens or more); the copier still recalls nothing."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  tok, rows_N2L, answer_NL = rows
  cfg = tiny_config(str(tmp_path))
  cfg.data.mask_id = tok.mask_id
  truth = rows_N2L[:, 0].copy()

  class LeftToRight(Oracle):
    def apply(self, variables, inputs_BL, segment_ids_BL=None):
      truth_BL = super().apply(variables, inputs_BL).argmax(-1)
      prev_shown = jnp.concatenate([jnp.ones_like(inputs_BL[:, :1], bool),
                                    inputs_BL[:, :-1] != tok.mask_id], axis=1)
      # Shown the previous token: the true one, sure; else a wrong one, unsure.
      return jnp.where(prev_shown[..., None], 9.0 * jnp.eye(264)[truth_BL],
                       2.0 * jnp.eye(264)[(truth_BL + 1) % 264])

  model = LeftToRight(False, shift)
  assert (answer_NL.sum(1) >= 2).all()
  got = lambda unmask, m=model: recall.recalled(cfg, m, truth, rows_N2L, answer_NL, batch=2,
                                                unmask=unmask).tolist()
  assert got('confidence') == [True] * 3 and got('one_pass') == [False] * 3

  class Copier(Oracle):
    def apply(self, variables, inputs_BL, segment_ids_BL=None):
      return jnp.eye(264)[inputs_BL]

  assert got('confidence', Copier(False)) == [False] * 3
  # Each token masked alone: the token before it is always shown.
  assert got('alone') == [True] * 3 and got('alone', Copier(False)) == [False] * 3
  with pytest.raises(ValueError, match="unmask='greedy' / reading='model': not one of"):
    got('greedy')


def test_causal_reading_of_an_adapted_model_is_its_ar_source_teacher_forced(rows):
  """A bidirectional model with shifted logits, read causally with each answer token masked
  alone, predicts exactly what the causal model with the same params predicts teacher-forced;
  read with its own attention (or one pass), it does not."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from pathways_jax.models.transformer import Transformer  # pylint: disable=g-import-not-at-top
  tok, rows_N2L, answer_NL = rows
  cfg = tiny_config('unused')
  cfg.data.mask_id = tok.mask_id
  model_cfg = config_lib.ModelConfig(vocab_size=tok.vocab_size, d_model=32, num_layers=2,
                                     num_heads=2, num_kv_heads=2, mlp_dim=64, max_len=64,
                                     init_std=0.5)
  ar = Transformer(model_cfg)
  params = nn.unbox(ar.init(jax.random.key(3), jnp.zeros((1, 32), jnp.int32))['params'])
  adapted = Transformer(model_cfg.replace(causal=False, shift_logits=True))
  pred = lambda model, **kw: recall.predictions(cfg, model, params, rows_N2L, answer_NL, 2, **kw)
  want = pred(ar)
  assert len({int(t) for t in want[answer_NL]}) > 3  # varied predictions: the test can tell
  np.testing.assert_array_equal(pred(adapted, unmask='alone', reading='causal'), want)
  for kw in (dict(unmask='alone'), dict(reading='causal')):
    assert (pred(adapted, **kw) != want).any(), kw


def test_document_items_ask_each_line_inside_its_own_document():
  data = tiny_config('unused').data
  items, ops = recall.document_items(data)
  docs = synthetic.documents(data.synthetic, 0, 'train')
  assert items and len(items) == len(ops)
  for (before, answer, after), op in zip(items, ops):
    assert before + answer + after in docs
    line = (before + answer).split('\n')[-1]
    assert line.split()[1] == op and answer == f' {eval(line.split(" = ")[0])}'  # pylint: disable=eval-used
  tok = tokenizers.ByteTokenizer()
  rows_N2L, answer_NL, keep = recall.answer_rows(tok, items[:5], 256)
  assert keep == [True] * 5
  for row, ans, (before, answer, after) in zip(rows_N2L, answer_NL, items):
    assert tok.decode(row[0][ans]) == answer and tok.decode(row[0][row[1] == 1][1:]) == before + answer + after


def test_new_names_are_names_the_world_does_not_hold():
  items = recall.new_name_items(64)
  world = synthetic.make_world(0, 200)
  known = {p.name.split()[0] for p in world.people}
  firsts = [answer.strip() for _, answer, _ in items]
  assert len(set(firsts)) > 50 and not known & set(firsts)
  assert all(f' {first} ' in before for (before, _, _), first in zip(items, firsts))


def test_the_command_on_a_run_directory_and_on_bad_input(tmp_path):
  """A tiny AR run probed end to end (the table and --out); a directory that is not a run, and
  no --run at all, are one line on stderr."""
  import json  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  from helpers import REPO  # pylint: disable=g-import-not-at-top
  from pathways_jax.train import loop  # pylint: disable=g-import-not-at-top
  cfg = tiny_config(str(tmp_path / 'cache'), **{'train.steps': 2, 'data.seq_len': 128,
                                                'model.max_len': 128, 'sample.prompts': ()})
  loop.train_stage(cfg, str(tmp_path / 'run'))
  script = os.path.join(REPO, 'experiments', 'arithmetic_recall.py')
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'PYTHONPATH': REPO}
  run = lambda *a: subprocess.run([sys.executable, script, *a], capture_output=True, text=True,
                                  env=env, timeout=300)
  out = run(f'--run={tmp_path / "run"}', f'--out={tmp_path / "t.json"}')
  assert out.returncode == 0, out.stderr
  table = json.loads((tmp_path / 't.json').read_text())[str(tmp_path / 'run')]
  read = synthetic.arithmetic_problems(cfg.data.synthetic, 0, 'train')
  assert table['read']['all'][1] == table['unread']['all'][1] == len(read)
  assert table['new_name_copied']['all'][1] == 256 and table['read_in_document']['all'][1] > 0
  # Documents longer than a row keep the lines around the answer that fit (bytes: a few).
  assert table['read_in_document']['all'][1] == len(recall.document_items(cfg.data)[0])
  assert f'| {tmp_path / "run"} | read | ' in out.stdout
  bad = run(f'--run={tmp_path}')
  assert bad.returncode == 1 and bad.stderr.strip().startswith(f'error: {tmp_path}: ')
  assert run().stderr.strip() == 'error: name at least one --run directory'
  assert run(f'--run={tmp_path / "run"}', '--batch=0').stderr.strip() == (
      'error: --batch=0 must be >= 1')


def test_a_long_text_keeps_the_lines_nearest_its_answer_and_one_too_long_is_dropped():
  tok = tokenizers.ByteTokenizer()
  item = ('1 + 1 = 2\n2 + 2 = 4\n3 + 3 =', ' 6', '\n4 + 4 = 8')
  rows, answer, keep = recall.answer_rows(tok, [item], 24)
  assert keep == [True] and tok.decode(rows[0, 0][rows[0, 1] == 1][1:]) == '2 + 2 = 4\n3 + 3 = 6'
  assert tok.decode(rows[0, 0][answer[0]]) == ' 6'
  rows, answer, keep = recall.answer_rows(tok, [('x' * 40, ' 1', '')], 24)
  assert rows.shape == (0, 2, 24) and keep == [False]
