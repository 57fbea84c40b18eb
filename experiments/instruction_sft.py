"""SFT on the embedded instruction set: format compliance and accuracy, base vs fine-tuned.

    python -m pathways_jax.main --config=experiments/instruction_sft.py --workdir=runs/instr \
        [--config.seed=1 --config.instructions.sft_steps=300 ...]

1. The instruction set of the config's synthetic world (`pathways_jax.data.instructions`) is
   written to WORKDIR/instructions/{train,heldout}.jsonl: no held-out question is asked in
   training (`instructions.split_by='question'`); with 'subject', no held-out fact either.
2. A tiny AR base is pretrained on the synthetic corpus of the same world (biographies, stories,
   arithmetic; a sentencepiece tokenizer trained on it) in WORKDIR/base.
3. The base is fine-tuned on train.jsonl through the project trainer: task 'sft',
   data.corpus='chat' (loss on the assistant turns only), train.init_from=WORKDIR/base, in
   WORKDIR/sft; and, with `instructions.lora_rank` > 0 (8 by default), the same SFT as a LoRA run
   (the base frozen, adapters on every dense weight, and the embedding and norm scales trained
   beside them: `instructions.lora_also_train`) in WORKDIR/lora.
4. All are evaluated on the held-out split (`pathways_jax.eval.instructions`: the chat template
   up to the assistant turn, greedy decoding to eos).

WORKDIR/results.json: `base`, `sft` and `lora` (format_compliance, accuracy, strict_accuracy,
counts, per kind / format / template / fact group, sample outputs), the stages' wall times and
parameter counts, date, device, config.
Finished stages (a run directory whose results.json says completed) are skipped, so the same
command resumes; `--config.seed` changes the training seeds only (initialisation, data order),
not the world or the instruction set.
"""
from __future__ import annotations

import copy
import datetime
import json
import os
import platform
import time

import ml_collections

from pathways_jax.config import base_config


def get_config():
  c = base_config()
  c.name = 'instruction_sft'
  c.seed = 0
  c.objective = 'autoregressive'
  c.data.corpus = 'synthetic'
  c.data.tokenizer = 'sentencepiece'  # trained on the synthetic corpus; names are a few pieces
  c.data.vocab_size = 1024
  # A small world: the facts are learnt from a few hundred steps of SFT (the base, at this size
  # and budget, knows few of them; docs/sft.md), and every one of them is asked several ways.
  c.data.synthetic.seed = 0
  c.data.synthetic.num_people = 60
  c.data.synthetic.num_stories = 60
  c.data.synthetic.num_arithmetic = 1000
  c.data.seq_len = 128  # the longest conversation is ~90 tokens
  c.data.batch_size = 16
  c.data.eval_batches = 4
  c.model.d_model = 128
  c.model.num_layers = 4
  c.model.num_heads = 4
  c.model.num_kv_heads = 2
  c.model.mlp_dim = 384
  c.model.max_len = 128
  c.model.attention = 'cpu'  # the fused XLA:CPU kernel; falls back to 'xla' off CPU
  c.train.steps = 400  # the base's pretraining
  c.train.lr = 3e-3
  c.train.warmup_steps = 40
  c.train.log_every = 20
  c.train.eval_every = 200
  c.train.checkpoint_every = 200
  c.train.progress_bar = False
  c.sample.prompts = ()
  c.instructions = i = ml_collections.ConfigDict()
  i.num_arithmetic = 100  # distinct problems in the instruction set
  i.variants = 2  # formats per training question
  i.heldout_fraction = 0.2
  i.split_by = 'question'  # the unit held out: 'question' (its text) or 'subject' (the fact)
  i.sft_steps = 800
  i.sft_lr = 4e-3
  i.sft_warmup_steps = 20
  # The LoRA arm (0: none): the same SFT with the base frozen and adapters of this rank on every
  # dense weight (model.lora_targets='all-linear'), in WORKDIR/lora.
  i.lora_rank = 8
  i.lora_alpha = 16.0
  i.lora_lr = 1e-2
  i.lora_steps = 0  # 0: as many as the full fine-tuning (instructions.sft_steps)
  i.lora_weight_decay = 0.1
  # Params trained beside the adapters, as PEFT's modules_to_save (a train.trainable alternative
  # matched in full against paths such as 'embed' or '.*scale'); '' trains the adapters alone.
  # The (tied) embedding and the norm scales by default: on this base, adapters on the dense
  # weights, of any rank, stop where fine-tuning all the dense weights does, far above full SFT
  # (docs/sft.md).
  i.lora_also_train = 'embed|.*scale'
  i.eval_batch = 64
  i.eval_limit = 0  # > 0: evaluate the first N held-out examples only (quick runs)
  return c


def instruction_set(cfg):
  from pathways_jax.data import instructions  # pylint: disable=g-import-not-at-top
  i = cfg.instructions
  return instructions.from_config(cfg.data, num_arithmetic=i.num_arithmetic, variants=i.variants,
                                  heldout_fraction=i.heldout_fraction, split_by=i.split_by)


def provenance(cfg, examples) -> dict:
  """The evaluator's grouping arguments: the training split's facts (`fact/trained|unseen`) and
  the arithmetic problems the base's pretraining corpus works out
  (`problem/in_corpus|not_in_corpus`)."""
  from pathways_jax.data import corpora, synthetic  # pylint: disable=g-import-not-at-top,multiple-import
  return {'train_keys': {e.key for e in examples['train']},
          'corpus_problems': synthetic.arithmetic_problems(
              cfg.data.synthetic, corpora.synthetic_seed(cfg.data), 'train')}


def base_config_of(cfg):
  c = copy.deepcopy(cfg)
  c.name = f'{cfg.name}-base'
  return c


def sft_config_of(cfg, train_path: str, base_dir: str):
  c = copy.deepcopy(cfg)
  c.name = f'{cfg.name}-sft'
  c.task = 'sft'
  c.data.corpus = 'chat'
  c.data.path = os.path.abspath(train_path)
  c.train.init_from = os.path.abspath(base_dir)
  c.train.steps = cfg.instructions.sft_steps
  c.train.lr = cfg.instructions.sft_lr
  c.train.warmup_steps = cfg.instructions.sft_warmup_steps
  c.train.eval_every = cfg.instructions.sft_steps
  c.train.checkpoint_every = cfg.instructions.sft_steps
  return c


def lora_config_of(cfg, train_path: str, base_dir: str):
  c = sft_config_of(cfg, train_path, base_dir)
  c.name = f'{cfg.name}-lora'
  c.model.lora_rank = cfg.instructions.lora_rank
  c.model.lora_alpha = cfg.instructions.lora_alpha
  c.train.lr = cfg.instructions.lora_lr
  c.train.weight_decay = cfg.instructions.lora_weight_decay
  also = cfg.instructions.get('lora_also_train', '')
  if also:
    from pathways_jax.adapters.lora import LORA_PARAMS  # pylint: disable=g-import-not-at-top
    c.train.trainable = f'{LORA_PARAMS}|{also}'
  steps = cfg.instructions.get('lora_steps', 0) or cfg.instructions.sft_steps
  c.train.steps = c.train.eval_every = c.train.checkpoint_every = steps
  return c


def _train(cfg, run_dir: str) -> dict:
  from pathways_jax.train import loop  # pylint: disable=g-import-not-at-top
  return loop.train_stage(cfg, run_dir)


def run(cfg, workdir: str) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  from pathways_jax.data import instructions  # pylint: disable=g-import-not-at-top
  from pathways_jax.eval import instructions as instr_eval  # pylint: disable=g-import-not-at-top
  start = time.perf_counter()
  os.makedirs(workdir, exist_ok=True)
  examples = instruction_set(cfg)
  paths = instructions.write_splits(examples, os.path.join(workdir, 'instructions'))
  heldout = examples['heldout']
  if cfg.instructions.eval_limit > 0:
    heldout = heldout[:cfg.instructions.eval_limit]
  dirs = {arm: os.path.join(workdir, arm) for arm in ('base', 'sft', 'lora')}
  if not cfg.instructions.lora_rank:
    del dirs['lora']
  wall, trained = {}, {}
  t0 = time.perf_counter()
  base_res = _train(base_config_of(cfg), dirs['base'])
  wall['base_train_s'] = time.perf_counter() - t0
  for arm, make in (('sft', sft_config_of), ('lora', lora_config_of)):
    if arm in dirs:
      t0 = time.perf_counter()
      trained[arm] = _train(make(cfg, paths['train'], dirs['base']), dirs[arm])
      wall[f'{arm}_train_s'] = time.perf_counter() - t0
  evals = {}
  for name, run_dir in dirs.items():
    t0 = time.perf_counter()
    evals[name] = instr_eval.evaluate_run(run_dir, heldout, batch_size=cfg.instructions.eval_batch,
                                          **provenance(cfg, examples))
    wall[f'{name}_eval_s'] = time.perf_counter() - t0
    print(f'{name}: format compliance {evals[name]["format_compliance"]:.3f} '
          f'({evals[name]["format_ok_count"]}/{evals[name]["n"]}), accuracy '
          f'{evals[name]["accuracy"]:.3f} ({evals[name]["correct_count"]}/{evals[name]["n"]})')
  wall['total_s'] = time.perf_counter() - start
  results = {
      'status': 'completed', 'seed': cfg.seed,
      'examples': {s: len(v) for s, v in examples.items()}, 'evaluated': len(heldout),
      **evals, 'base_val_loss': base_res.get('val_loss'),
      **{f'{arm}_{k}': r.get(k) for arm, r in trained.items()
         for k in ('val_loss', 'train_loss', 'params', 'trainable_params')},
      'wall_s': wall,
      'date': datetime.date.today().isoformat(),
      'device': {'kind': jax.devices()[0].device_kind, 'platform': jax.default_backend(),
                 'count': jax.device_count(), 'cpus': os.cpu_count(),
                 'machine': platform.machine()},
      'config': json.loads(cfg.to_json_best_effort())}
  with open(os.path.join(workdir, 'results.json'), 'w') as f:
    json.dump(results, f, indent=2, default=str)
  return results
