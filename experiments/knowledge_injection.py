"""Knowledge injection: four ways to give a model facts about people it has never seen.

    python -m pathways_jax.main --config=experiments/knowledge_injection.py --workdir=runs/ki \
        [--config.seed=1 --config.ki.inject_steps=300 ...]

The survey's four paradigms, on one base model and one set of new facts:
  static   -- full fine-tuning on the new facts;
  modular  -- a LoRA adapter (rank ki.lora_rank, every dense weight) on the frozen base;
  dynamic  -- no training: a BM25 index (bm25s) of the new facts' documents, and the top
              ki.passages passages for a question put before it in the prompt;
  prompt   -- no training, no retrieval: the question alone (the baseline).

Three worlds of the synthetic generator (data/synthetic.py), with no name or description in two:
  old    (data.synthetic.seed)  the base's pretraining corpus and its closed-book questions;
  reader (ki.reader_seed)       people seen only in passages, on which the base learns to read;
  new    (ki.new_seed)          the new facts: one biography per person, the documents.

Stages, each a run of the project trainer in WORKDIR/<stage> (a finished one is skipped, so the
same command resumes):
  base_pretrain  a tiny AR model pretrained on the old world's corpus;
  base           SFT of it (task 'sft') on base.jsonl: the old world's instruction set (closed
                 book); questions about reader people with their biography among ki.passages
                 passages (open book); and old-world questions with ki.passages unrelated reader
                 passages, to be answered from memory. This is the model every arm starts from.
  static         full fine-tuning of base on new_train.jsonl: every question about the new
                 people in the instruction set's templates 0 and 1, in two formats each;
  modular        the same data and steps, a LoRA adapter.

Measured, per arm (WORKDIR/results.json, printed as a table):
  new facts  accuracy on every question about the new people in template 2, a phrasing no stage
             trains on (instruction-set rules: `check`'s lenient accuracy, and format compliance);
  old facts  accuracy on ki.old_eval questions about old people that the base was trained on
             (retention: what fine-tuning on the new facts made the model forget); the dynamic
             arm is measured as deployed, with retrieval over the new facts on every question;
  cost       trainable parameters, training wall time and tokens, prompt tokens per question
             and evaluation wall time; the dynamic arm's retrieval recall (the subject's
             biography among the retrieved passages).
`--config.seed` changes the training seeds of every stage (initialisation, data order), not the
worlds or the questions.
"""
from __future__ import annotations

import copy
import datetime
import json
import os
import platform
import random
import time

import ml_collections

from pathways_jax.config import base_config

ARMS = ('prompt', 'static', 'modular', 'dynamic')


def get_config():
  c = base_config()
  c.name = 'knowledge_injection'
  c.seed = 0
  c.objective = 'autoregressive'
  c.data.corpus = 'synthetic'
  c.data.tokenizer = 'sentencepiece'
  c.data.vocab_size = 1024
  c.data.synthetic.seed = 0
  c.data.synthetic.num_people = 60
  c.data.synthetic.num_stories = 60
  c.data.synthetic.num_arithmetic = 1000
  c.data.seq_len = 128
  c.data.batch_size = 16
  c.data.eval_batches = 4
  c.model.d_model = 128
  c.model.num_layers = 4
  c.model.num_heads = 4
  c.model.num_kv_heads = 2
  c.model.mlp_dim = 384
  c.model.max_len = 448  # room for open-book prompts (one biography and a question: <= 220 here)
  c.model.attention = 'cpu'  # the fused XLA:CPU kernel; falls back to 'xla' off CPU
  c.train.steps = 400  # base_pretrain
  c.train.lr = 3e-3
  c.train.warmup_steps = 40
  c.train.log_every = 20
  c.train.eval_every = 200
  c.train.checkpoint_every = 200
  c.train.progress_bar = False
  c.sample.prompts = ()
  c.ki = k = ml_collections.ConfigDict()
  k.reader_seed = 1
  k.reader_people = 1500
  k.reader_questions = 2  # questions per reader person (kinds, templates, formats at random)
  k.new_seed = 2
  k.new_people = 48  # ~40 after dropping those whose name or description an earlier world has
  k.passages = 1  # passages per open-book prompt (training and retrieval alike)
  k.num_arithmetic = 100  # the old world's instruction set, as experiments/instruction_sft.py
  k.memory_share = 0.25  # old-world questions also asked with unrelated passages, per question
  k.base_steps = 600
  k.base_lr = 3e-3
  k.base_seq_len = 256
  k.inject_steps = 300
  k.static_lr = 1e-3
  k.lora_rank = 8
  k.lora_alpha = 16.0
  k.modular_lr = 5e-3
  k.warmup_steps = 20
  k.old_eval = 200
  k.eval_batch = 64
  k.eval_limit = 0  # > 0: evaluate the first N new-fact questions only (quick runs)
  return c


# ------------------------------------------------------------------------------------------ data

def worlds(cfg):
  """(old world, {'old': people, 'reader': people, 'new': people}, {'reader': w, 'new': w}):
  new people (then reader people) keep only those whose name and description no earlier world
  has (new before reader: the reader world is large and would leave few new descriptions)."""
  from pathways_jax.data import synthetic  # pylint: disable=g-import-not-at-top
  old = synthetic.world_from_config(cfg.data)
  taken = {p.name for p in old.people} | {p.description for p in old.people}
  people, others = {'old': list(old.people)}, {}
  for name, seed, n in (('new', cfg.ki.new_seed, cfg.ki.new_people),
                        ('reader', cfg.ki.reader_seed, cfg.ki.reader_people)):
    w = synthetic.make_world(seed, n)
    people[name] = [p for p in w.people if p.name not in taken and p.description not in taken]
    taken |= {p.name for p in w.people} | {p.description for p in w.people}
    others[name] = w
  return old, people, others


def biographies(world, people, seed_text: str) -> dict[str, str]:
  """{name: one biography} (data/synthetic.biography, with a seeded choice of phrasing)."""
  from pathways_jax.data import synthetic  # pylint: disable=g-import-not-at-top
  rng = random.Random(f'knowledge_injection/{seed_text}')
  return {p.name: synthetic.biography(world, p, rng) for p in people}


def make_data(cfg) -> dict:
  """Every example set of the experiment (instruction-set Examples) and the new documents."""
  from pathways_jax.data import instructions as I  # pylint: disable=g-import-not-at-top
  ki = cfg.ki
  old, people, others = worlds(cfg)
  rng = random.Random(f'knowledge_injection/{ki.reader_seed}/{ki.new_seed}/mix')
  old_train = I.make_examples(old, num_arithmetic=ki.num_arithmetic)['train']
  reader_bios = biographies(others['reader'], people['reader'], 'reader')
  reader_names = list(reader_bios)

  def distractors(n, exclude=None):
    return [reader_bios[x] for x in rng.sample([m for m in reader_names if m != exclude], n)]

  # Each reader person is asked `reader_questions` questions: with few questions per person and
  # many people, answering from memory cannot pay and reading must (with 200 people asked every
  # question, the base memorised them and learnt not to read: docs/knowledge_injection.md).
  by_subject = {}
  for e in I.person_questions(others['reader'], people=people['reader'], templates=(0, 1)):
    by_subject.setdefault(e.subject, []).append(e)
  reading = []
  for e in [q for qs in by_subject.values()
            for q in rng.sample(qs, min(ki.reader_questions, len(qs)))]:
    passages = distractors(ki.passages - 1, exclude=e.subject) + [reader_bios[e.subject]]
    rng.shuffle(passages)
    reading.append(I.open_book(e, passages))
  old_facts = [e for e in old_train if e.kind in I.PERSON_KINDS]
  memory = [I.open_book(e, distractors(ki.passages))
            for e in rng.sample(old_facts, int(ki.memory_share * len(old_facts)))]
  base = old_train + reading + memory
  rng.shuffle(base)
  new_docs = biographies(others['new'], people['new'], 'new')
  new_eval = sorted(I.person_questions(others['new'], people=people['new'], templates=(2,)),
                    key=lambda e: I._hash(e.prompt))  # pylint: disable=protected-access
  old_eval = sorted(old_facts, key=lambda e: I._hash(e.prompt))[:ki.old_eval]  # pylint: disable=protected-access
  return {'base': base, 'old_train': old_train, 'reading': reading, 'memory': memory,
          'new_train': I.person_questions(others['new'], people=people['new'], templates=(0, 1),
                                          variants=2),
          'new_eval': new_eval[:ki.eval_limit] if ki.eval_limit > 0 else new_eval,
          'old_eval': old_eval, 'new_docs': new_docs,
          'people': {k: len(v) for k, v in people.items()}}


def with_retrieval(examples, index, k: int, doc_of: dict[str, int]):
  """(open-book examples with the top-k passages for each question, recall: the share of
  questions whose subject's own document (`doc_of[subject]`, an index position) is among them;
  None when no subject has one)."""
  from pathways_jax.data import instructions as I  # pylint: disable=g-import-not-at-top
  ids_QK, _ = index.search([e.question for e in examples], k)
  out, hits, known = [], 0, 0
  for e, ids in zip(examples, ids_QK):
    out.append(I.open_book(e, [index.passages[i] for i in ids[::-1]]))  # best nearest the question
    if e.subject in doc_of:
      known += 1
      hits += doc_of[e.subject] in ids
  return out, (hits / known if known else None)


# ---------------------------------------------------------------------------------------- stages

def _stage(cfg, name: str, data_path: str, init_from: str, *, steps: int, lr: float,
           seq_len: int | None = None, lora_rank: int = 0):
  c = copy.deepcopy(cfg)
  c.name = f'{cfg.name}-{name}'
  c.task = 'sft'
  c.data.corpus = 'chat'
  c.data.path = os.path.abspath(data_path)
  c.data.seq_len = seq_len or cfg.data.seq_len
  c.train.init_from = os.path.abspath(init_from)
  c.train.steps = steps
  c.train.lr = lr
  c.train.warmup_steps = cfg.ki.warmup_steps
  c.train.eval_every = c.train.checkpoint_every = steps
  if lora_rank:
    c.model.lora_rank = lora_rank
    c.model.lora_alpha = cfg.ki.lora_alpha
  return c


def stage_configs(cfg, files: dict, dirs: dict) -> dict:
  ki = cfg.ki
  base_pretrain = copy.deepcopy(cfg)
  base_pretrain.name = f'{cfg.name}-base_pretrain'
  return {
      'base_pretrain': base_pretrain,
      'base': _stage(cfg, 'base', files['base'], dirs['base_pretrain'], steps=ki.base_steps,
                     lr=ki.base_lr, seq_len=ki.base_seq_len),
      'static': _stage(cfg, 'static', files['new_train'], dirs['base'], steps=ki.inject_steps,
                       lr=ki.static_lr),
      'modular': _stage(cfg, 'modular', files['new_train'], dirs['base'], steps=ki.inject_steps,
                        lr=ki.modular_lr, lora_rank=ki.lora_rank)}


def _train(cfg, run_dir: str) -> dict:
  from pathways_jax.train import loop  # pylint: disable=g-import-not-at-top
  return loop.train_stage(cfg, run_dir)


def _evaluate(loaded, parts: dict, batch: int) -> dict:
  """{part: scores} of a loaded run (`sample.load_run`) on each part's examples: greedy outputs
  (`eval.instructions`) and teacher-forced answer NLLs, all parts in one batch sequence so a
  model compiles once per measure."""
  from pathways_jax.eval import instructions as instr_eval  # pylint: disable=g-import-not-at-top
  _, model, params, tok = loaded
  examples = [e for part in parts.values() for e in part]
  t0 = time.perf_counter()
  outputs = instr_eval.generate_outputs(model, params, tok, examples, batch_size=batch)
  wall = time.perf_counter() - t0
  nlls = instr_eval.answer_nlls(model, params, tok, examples, batch_size=batch)
  out, start = {}, 0
  for name, part in parts.items():
    end = start + len(part)
    res = instr_eval.score(part, outputs[start:end])
    res['samples'] = [{'prompt': e.prompt, 'expected': e.answer, 'output': o['text']}
                      for e, o in zip(part[:8], outputs[start:start + 8])]
    res['answer_nll'] = sum(nlls[start:end]) / len(part)
    res['prompt_tokens'] = sum(len(instr_eval.prompt_tokens(tok, e)) for e in part) / len(part)
    res['wall_s'] = wall * len(part) / len(examples)  # generation time, shared by example count
    out[name], start = res, end
  return out


def run(cfg, workdir: str) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  from pathways_jax.data import instructions as I  # pylint: disable=g-import-not-at-top
  from pathways_jax.data import retrieval  # pylint: disable=g-import-not-at-top
  start = time.perf_counter()
  os.makedirs(workdir, exist_ok=True)
  data = make_data(cfg)
  files = {s: I.write_jsonl(data[s], os.path.join(workdir, 'data', f'{s}.jsonl'))
           for s in ('base', 'new_train', 'new_eval', 'old_eval')}
  with open(os.path.join(workdir, 'data', 'new_documents.jsonl'), 'w') as f:
    for name, text in data['new_docs'].items():
      f.write(json.dumps({'name': name, 'text': text}) + '\n')
  dirs = {s: os.path.join(workdir, s) for s in ('base_pretrain', 'base', 'static', 'modular')}
  trained = {s: _train(c, dirs[s]) for s, c in stage_configs(cfg, files, dirs).items()}

  index = retrieval.BM25Index(list(data['new_docs'].values()))
  doc_of = {name: i for i, name in enumerate(data['new_docs'])}
  t0 = time.perf_counter()
  new_rag, new_recall = with_retrieval(data['new_eval'], index, cfg.ki.passages, doc_of)
  old_rag, _ = with_retrieval(data['old_eval'], index, cfg.ki.passages, doc_of)
  retrieval_s = time.perf_counter() - t0
  plan = {'prompt': ('base', data['new_eval'], data['old_eval']),
          'static': ('static', data['new_eval'], data['old_eval']),
          'modular': ('modular', data['new_eval'], data['old_eval']),
          'dynamic': ('base', new_rag, old_rag)}
  from pathways_jax.sample import load_run  # pylint: disable=g-import-not-at-top
  loaded = {stage: load_run(dirs[stage]) for stage in ('base', 'static', 'modular')}
  arms = {}
  for arm, (stage, new_examples, old_examples) in plan.items():
    scores = _evaluate(loaded[stage], {'new': new_examples, 'old': old_examples},
                       cfg.ki.eval_batch)
    new, old = scores['new'], scores['old']
    injected = trained.get(stage) if arm in ('static', 'modular') else None
    arms[arm] = {
        'new': new, 'old': old,
        'trainable_params': injected['trainable_params'] if injected else 0,
        'params': trained['base']['params'] if not injected else injected['params'],
        'train_wall_s': injected['wall_s'] if injected else 0.0,
        'train_tokens': injected['tokens'] if injected else 0,
        'retrieval_recall': new_recall if arm == 'dynamic' else None,
        'retrieval_wall_s': retrieval_s if arm == 'dynamic' else 0.0}
    print(f'{arm:8s} new-fact accuracy {new["accuracy"]:.3f} ({new["correct_count"]}/{new["n"]}),'
          f' old-fact accuracy {old["accuracy"]:.3f} ({old["correct_count"]}/{old["n"]}), '
          f'answer NLL new {new["answer_nll"]:.3f} old {old["answer_nll"]:.3f}, '
          f'trainable {arms[arm]["trainable_params"]}, prompt {new["prompt_tokens"]:.0f} tokens')
  results = {
      'status': 'completed', 'seed': cfg.seed, 'arms': arms,
      'examples': {k: len(v) for k, v in data.items() if isinstance(v, list)},
      'people': data['people'], 'new_documents': len(data['new_docs']),
      'stages': {s: {k: r.get(k) for k in ('wall_s', 'tokens', 'params', 'trainable_params',
                                           'train_loss', 'val_loss')}
                 for s, r in trained.items()},
      'wall_s': time.perf_counter() - start, 'date': datetime.date.today().isoformat(),
      'device': {'kind': jax.devices()[0].device_kind, 'platform': jax.default_backend(),
                 'count': jax.device_count(), 'cpus': os.cpu_count(),
                 'machine': platform.machine()},
      'config': json.loads(cfg.to_json_best_effort())}
  with open(os.path.join(workdir, 'results.json'), 'w') as f:
    json.dump(results, f, indent=2, default=str)
  return results


# --------------------------------------------------------------------------------------- summary

MEASURES = ('new_accuracy', 'new_format', 'new_nll', 'old_accuracy', 'old_nll',
            'trainable_params', 'train_wall_s', 'prompt_tokens', 'retrieval_recall')


def flat(results: dict) -> dict:
  """{arm: {measure: value}} of one run's results.json (what docs/results/data keeps)."""
  return {arm: {'new_accuracy': a['new']['accuracy'],
                'new_format': a['new']['format_compliance'],
                'new_nll': a['new']['answer_nll'], 'old_accuracy': a['old']['accuracy'],
                'old_nll': a['old']['answer_nll'], 'trainable_params': a['trainable_params'],
                'train_wall_s': a['train_wall_s'], 'prompt_tokens': a['new']['prompt_tokens'],
                'retrieval_recall': a['retrieval_recall']}
          for arm, a in results['arms'].items()}


def summary(seeds: list[dict]) -> dict:
  """{arm: {measure: (mean, sample std)}} over seeds' `flat` dicts."""
  import statistics  # pylint: disable=g-import-not-at-top
  out = {}
  for arm in ARMS:
    out[arm] = {}
    for m in MEASURES:
      values = [s[arm][m] for s in seeds if s[arm].get(m) is not None]
      out[arm][m] = ((statistics.fmean(values), statistics.stdev(values) if len(values) > 1
                      else 0.0) if values else (None, None))
  return out


def markdown_table(seeds: list[dict]) -> str:
  """The docs' table: mean ± sample std over seeds (`flat` dicts) of each arm's measures."""
  s = summary(seeds)
  rows = ['| arm | new facts: accuracy | new: answer NLL | old facts: accuracy | old: answer NLL '
          '| trainable params | training wall (s) | prompt tokens |',
          '|---|---|---|---|---|---|---|---|']
  for arm in ARMS:
    m = s[arm]
    pm = lambda k, f='.3f': f'{m[k][0]:{f}} ± {m[k][1]:{f}}'  # pylint: disable=cell-var-from-loop
    rows.append(f'| {arm} | {pm("new_accuracy")} | {pm("new_nll", ".2f")} | '
                f'{pm("old_accuracy")} | {pm("old_nll", ".2f")} | '
                f'{m["trainable_params"][0]:,.0f} | {m["train_wall_s"][0]:.0f} | '
                f'{m["prompt_tokens"][0]:.0f} |')
  return '\n'.join(rows)
