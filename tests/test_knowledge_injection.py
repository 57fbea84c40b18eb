"""experiments/knowledge_injection.py: its data rules, its BM25 retrieval against a plain BM25,
and a tiny end-to-end run of the four arms."""
import json
import math

import numpy as np
import pytest

from helpers import experiment_module, tiny_config
from pathways_jax.data import instructions as I
from pathways_jax.data import retrieval


def _experiment():
  return experiment_module('knowledge_injection')


def _plain_bm25(docs_words, query_words, k1=1.5, b=0.75):
  """BM25 as Lucene (>= 8) scores it, written for the test: idf log(1 + (N - n + 0.5) / (n + 0.5))
  times tf / (tf + k1 (1 - b + b |d| / avg|d|)) -- Okapi's term without its constant (k1 + 1)
  factor, which changes no ranking."""
  n_docs = len(docs_words)
  avg = sum(len(d) for d in docs_words) / n_docs
  scores = []
  for d in docs_words:
    s = 0.0
    for w in set(query_words):
      n = sum(w in other for other in docs_words)
      if not n:
        continue
      tf = d.count(w)
      idf = math.log(1 + (n_docs - n + 0.5) / (n + 0.5))
      s += idf * tf / (tf + k1 * (1 - b + b * len(d) / avg))
    scores.append(s)
  return np.array(scores)


def test_bm25_index_matches_a_plain_bm25():
  # No English stop words and no one-letter words here, so the words are the plain split.
  docs = ['salt fountain keeper brylun ruchefur born byfem astronomer',
          'iron compass keeper dutri deachim weaver zytri',
          'golden telescope founder gris sikygri astronomer zytri zytri',
          'brylun friends dutri gris']
  index = retrieval.BM25Index(docs)
  queries = ['keeper iron compass', 'astronomer zytri', 'brylun']
  ids_QK, scores_QK = index.search(queries, k=4)
  for q, ids, scores in zip(queries, ids_QK, scores_QK):
    want = _plain_bm25([d.split() for d in docs], q.split())
    np.testing.assert_allclose(scores, want[ids], rtol=1e-5)
    np.testing.assert_allclose(np.sort(scores)[::-1], np.sort(want)[::-1], rtol=1e-5)
  assert ids_QK[0, 0] == 1 and index.top_passages('golden telescope', 1) == [docs[2]]
  # Stop words and case do not count: 'Who is the' adds nothing to 'keeper iron compass'.
  np.testing.assert_allclose(index.search(['Who is the Keeper of the IRON compass?'], 4)[1],
                             scores_QK[:1], rtol=1e-6)
  with pytest.raises(ValueError, match='k=5'):
    index.search(['x'], k=5)
  with pytest.raises(ValueError, match='no passages'):
    retrieval.BM25Index([])


def test_the_data_keeps_new_facts_out_of_training_and_worlds_apart():
  m = _experiment()
  cfg = m.get_config()
  data = m.make_data(cfg)
  old, people, _ = m.worlds(cfg)
  names = {w: {p.name for p in ps} for w, ps in people.items()}
  descriptions = {w: {p.description for p in ps} for w, ps in people.items()}
  for a, b in (('old', 'reader'), ('old', 'new'), ('reader', 'new')):
    assert not names[a] & names[b] and not descriptions[a] & descriptions[b]
  assert len(names['new']) >= 35 and len(data['new_docs']) == len(names['new'])
  assert {e.template for e in data['new_eval']} == {2}
  assert {e.template for e in data['new_train']} == {0, 1}
  assert {e.subject for e in data['new_eval']} == names['new']
  assert {e.kind for e in data['new_eval']} == set(I.PERSON_KINDS)
  trained_prompts = {e.prompt for e in data['new_train'] + data['base']}
  assert not any(e.question in p for e in data['new_eval'] for p in trained_prompts)
  # The base never sees a new person; each reading example holds its subject's biography.
  base_text = '\n'.join(e.prompt + e.answer for e in data['base'])
  assert not any(n in base_text for n in names['new'])
  reader_bios = m.biographies(m.worlds(cfg)[2]['reader'], people['reader'], 'reader')
  for e in data['reading']:
    assert reader_bios[e.subject] in e.prompt and e.prompt.count('Passage ') == cfg.ki.passages
  for e in data['memory']:  # unrelated passages: the answer comes from memory
    passages = e.prompt[:e.prompt.index('\n\n')]
    assert e.subject in names['old'] and not any(n in passages for n in names['old'])
  assert set(data['old_eval']) <= set(data['old_train']) and len(data['old_eval']) == 200
  assert old.seed == cfg.data.synthetic.seed


def test_retrieval_prompts_and_recall():
  m = _experiment()
  cfg = m.get_config()
  data = m.make_data(cfg)
  index = retrieval.BM25Index(list(data['new_docs'].values()))
  doc_of = {n: i for i, n in enumerate(data['new_docs'])}
  rag, recall = m.with_retrieval(data['new_eval'], index, 2, doc_of)
  assert recall > 0.95  # names and descriptions are rare words: BM25 finds the biography
  assert all(r.prompt.endswith(e.prompt) and r.answer == e.answer
             for r, e in zip(rag, data['new_eval']))
  _, none = m.with_retrieval(data['old_eval'], index, 2, doc_of)
  assert none is None


def test_the_experiment_end_to_end_on_tiny_settings(tmp_path):
  m = _experiment()
  cfg = tiny_config(str(tmp_path / 'cache'), **{
      'data.seq_len': 128, 'model.max_len': 512, 'train.steps': 2, 'train.log_every': 1,
      'model.attention': 'xla', 'sample.prompts': ()})
  cfg.ki = m.get_config().ki
  cfg.ki.base_steps = cfg.ki.inject_steps = 2
  cfg.ki.warmup_steps = 1
  cfg.ki.reader_people, cfg.ki.num_arithmetic = 20, 10
  cfg.ki.old_eval = cfg.ki.eval_limit = cfg.ki.eval_batch = 6
  res = m.run(cfg, str(tmp_path / 'run'))
  saved = json.loads((tmp_path / 'run' / 'results.json').read_text())
  assert set(saved['arms']) == set(m.ARMS)
  for arm, r in saved['arms'].items():
    for part in ('new', 'old'):
      assert r[part]['n'] == 6 and 0 <= r[part]['accuracy'] <= 1, (arm, part)
  arms = res['arms']
  assert arms['static']['trainable_params'] == arms['static']['params'] == arms['prompt']['params']
  assert arms['modular']['params'] == arms['prompt']['params'] + arms['modular']['trainable_params']
  assert arms['dynamic']['trainable_params'] == arms['prompt']['trainable_params'] == 0
  assert arms['dynamic']['new']['prompt_tokens'] > arms['prompt']['new']['prompt_tokens']
  assert arms['dynamic']['retrieval_recall'] is not None
  modular = json.loads((tmp_path / 'run' / 'modular' / 'config.json').read_text())
  assert modular['model']['lora_rank'] == 8
  assert modular['train']['init_from'] == str(tmp_path / 'run' / 'base')
  # answer_nll (the graded retention measure) against a plain per-example computation.
  from pathways_jax.eval import instructions as instr_eval
  from pathways_jax.sample import load_run
  _, model, params, tok = load_run(str(tmp_path / 'run' / 'static'))
  examples = I.read_jsonl(str(tmp_path / 'run' / 'data' / 'old_eval.jsonl'))[:3]
  plain = []
  for e in examples:
    prompt = list(instr_eval.prompt_tokens(tok, e))
    answer = list(tok.encode(e.answer)) + [tok.eos_id]
    logits = np.asarray(model.apply({'params': params}, np.array([prompt + answer], np.int32)),
                        np.float64)[0]
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1,
                                                                              keepdims=True)) - (
        logits.max(-1, keepdims=True))
    plain.append(-np.mean([logp[len(prompt) - 1 + i, t] for i, t in enumerate(answer)]))
  np.testing.assert_allclose(instr_eval.answer_nll(model, params, tok, examples, batch_size=2),
                             np.mean(plain), rtol=1e-5)
