"""Format compliance and answer accuracy of an AR or LLaDA model on the instruction set.

    res = evaluate_run('runs/sft', examples)   # examples: instructions.from_config(...)['heldout']
    res['format_compliance'], res['accuracy']

Each prompt is rendered as the user turn of a conversation up to the assistant's turn, with the
same chat template SFT trains on (`data.chat.prompt_ids`: the tokenizer's template, or the
built-in one), and answered greedily: an AR model by `sampling.autoregressive.generate`
(temperature 0, stopping at eos); a LLaDA model (model.causal=False) by the masked-diffusion
sampler (`sampling.diffusion.generate`: `max_new_tokens` masks, low-confidence remasking, one
token per step and one block unless `diffusion_steps` / `block_length` say otherwise, as
llada_sft trains it: answers padded with eos). The output is the generated text up to the first
eos; `data.instructions.check` judges it.
Prompts are left-padded to the longest one and decoded in batches of one fixed shape (the last
batch is filled with repeats, which are not scored), so a model compiles once.
"""
from __future__ import annotations

import collections
from typing import Sequence

import numpy as np

from pathways_jax.data import chat
from pathways_jax.data import instructions as instructions_lib


def prompt_tokens(tokenizer, example: instructions_lib.Example) -> np.ndarray:
  """The ids the model is given: the user turn and the template's start of the assistant turn."""
  return chat.prompt_ids(tokenizer, [{'role': 'user', 'content': example.prompt}])


def generate_outputs(model, params, tokenizer, examples: Sequence[instructions_lib.Example], *,
                     batch_size: int = 64, max_new_tokens: int = 0, temperature: float = 0.0,
                     seed: int = 0, diffusion_steps: int = 0,
                     block_length: int = 0) -> list[dict]:
  """[{'text': output up to eos, 'finished': emitted eos}] per example, greedy (or sampled at
  `temperature` > 0, batch k with key fold_in(key(seed), k)).

  max_new_tokens 0: the longest expected answer of `examples` in tokens, plus 8 (room for eos
  and a little more), within the model's max_len. diffusion_steps, block_length (LLaDA models
  only; 0: max_new_tokens): the diffusion sampler's steps and block length; with a
  block_length the window is rounded up to whole blocks (down where max_len ends first).
  """
  import jax  # pylint: disable=g-import-not-at-top
  from pathways_jax.eval.facts import left_pad  # pylint: disable=g-import-not-at-top
  from pathways_jax.sampling import autoregressive, diffusion  # pylint: disable=g-import-not-at-top,multiple-import
  if not examples:
    raise ValueError('no examples to evaluate (an empty split)')
  if batch_size < 1:
    raise ValueError(f'batch_size must be >= 1, got {batch_size}')
  prompts = [list(prompt_tokens(tokenizer, e)) for e in examples]
  width = max(len(p) for p in prompts)
  room = model.cfg.max_len - width
  if not max_new_tokens:
    max_new_tokens = max(len(tokenizer.encode(e.answer)) for e in examples) + 8
  max_new_tokens = min(max_new_tokens, room)
  if not model.cfg.causal and block_length:
    if block_length > room:
      raise ValueError(f'block_length={block_length} does not fit: prompts of {width} tokens '
                       f'leave {room} within model.max_len={model.cfg.max_len}')
    # The diffusion sampler decodes whole blocks: the window is a multiple of block_length.
    max_new_tokens = min(-(-max_new_tokens // block_length), room // block_length) * block_length
  if max_new_tokens < 1:
    raise ValueError(f'prompts of {width} tokens leave no room to answer within model.max_len='
                     f'{model.cfg.max_len}')
  batch_size = min(batch_size, len(prompts))
  specials = set(int(i) for i in tokenizer.special_ids)
  out = []
  for s in range(0, len(prompts), batch_size):
    chunk = prompts[s:s + batch_size]
    chunk = chunk + [chunk[-1]] * (batch_size - len(chunk))  # one shape: one compile
    tokens_BP, mask_BP = left_pad(chunk, tokenizer.pad_id, width)
    key = jax.random.fold_in(jax.random.key(seed), s // batch_size)
    if model.cfg.causal:
      tokens_BT = autoregressive.generate(model, params, tokens_BP, key=key,
                                          max_new_tokens=max_new_tokens, temperature=temperature,
                                          prompt_mask_BP=mask_BP, eos_id=tokenizer.eos_id,
                                          pad_id=tokenizer.pad_id)
    else:
      tokens_BT = diffusion.generate(model, params, tokens_BP, mask_id=tokenizer.mask_id,
                                     key=key, gen_length=max_new_tokens,
                                     steps=diffusion_steps or max_new_tokens,
                                     block_length=block_length or max_new_tokens,
                                     temperature=temperature, prompt_mask_BP=mask_BP)
    for row in np.asarray(tokens_BT)[:len(prompts) - s, width:]:
      ids = [int(t) for t in row]
      finished = tokenizer.eos_id in ids
      if finished:
        ids = ids[:ids.index(tokenizer.eos_id)]
      out.append({'text': tokenizer.decode([i for i in ids if i not in specials]),
                  'finished': finished})
  return out


def score(examples: Sequence[instructions_lib.Example], outputs: Sequence[dict], *,
          train_keys=None, corpus_problems=None) -> dict:
  """Means and counts of format_ok / correct / both, overall and per kind, format, template (a
  trained one or the held-out one); given the (kind, subject) keys of the training split, fact
  (asked in training in other words, or never); and given the arithmetic problems the
  pretraining corpus works out (`synthetic.arithmetic_problems`), an arithmetic question's
  problem (`problem/in_corpus` or `problem/not_in_corpus`)."""
  if len(examples) != len(outputs) or not examples:
    raise ValueError(f'{len(examples)} examples and {len(outputs)} outputs: need the same, > 0')
  rows = []
  for e, o in zip(examples, outputs):
    c = instructions_lib.check(e, o['text'])
    groups = [f'kind/{e.kind}', f'format/{e.format}',
              f'template/{"heldout" if e.heldout_template else "trained"}']
    if train_keys is not None:
      groups.append(f'fact/{"trained" if e.key in train_keys else "unseen"}')
    if corpus_problems is not None and e.kind == 'arithmetic':
      groups.append(f'problem/{"in_corpus" if e.subject in corpus_problems else "not_in_corpus"}')
    rows.append({'format_ok': c['format_ok'], 'correct': c['correct'],
                 'strict': c['format_ok'] and c['correct'], 'finished': o['finished'],
                 'groups': groups})

  def summary(rs):
    n = len(rs)
    return {'n': n, **{k: sum(r[k] for r in rs) / n
                       for k in ('format_ok', 'correct', 'strict', 'finished')}}

  by_group = collections.defaultdict(list)
  for r in rows:
    for g in r['groups']:
      by_group[g].append(r)
  total = summary(rows)
  return {'n': total['n'], 'format_compliance': total['format_ok'], 'accuracy': total['correct'],
          'strict_accuracy': total['strict'], 'finished': total['finished'],
          'format_ok_count': sum(r['format_ok'] for r in rows),
          'correct_count': sum(r['correct'] for r in rows),
          'groups': {g: summary(rs) for g, rs in sorted(by_group.items())}}


def evaluate(model, params, tokenizer, examples: Sequence[instructions_lib.Example], *,
             batch_size: int = 64, max_new_tokens: int = 0, num_samples: int = 8,
             train_keys=None, corpus_problems=None, diffusion_steps: int = 0,
             block_length: int = 0) -> dict:
  """`score` of greedy outputs, with the first `num_samples` (prompt, expected, output) triples."""
  outputs = generate_outputs(model, params, tokenizer, examples, batch_size=batch_size,
                             max_new_tokens=max_new_tokens, diffusion_steps=diffusion_steps,
                             block_length=block_length)
  res = score(examples, outputs, train_keys=train_keys, corpus_problems=corpus_problems)
  res['samples'] = [{'prompt': e.prompt, 'expected': e.answer, 'output': o['text']}
                    for e, o in zip(examples[:num_samples], outputs[:num_samples])]
  return res


def evaluate_run(workdir: str, examples: Sequence[instructions_lib.Example], *,
                 step: int | None = None, **kwargs) -> dict:
  """`evaluate` on an AR or LLaDA run directory's newest (or `step`'s) checkpoint."""
  from pathways_jax.sample import load_run  # pylint: disable=g-import-not-at-top
  _, model, params, tokenizer = load_run(workdir, step)
  return evaluate(model, params, tokenizer, examples, **kwargs)


def answer_nll(model, params, tokenizer, examples: Sequence[instructions_lib.Example], *,
               batch_size: int = 64) -> float:
  """Mean over `examples` of `answer_nlls`."""
  return float(np.mean(answer_nlls(model, params, tokenizer, examples, batch_size=batch_size)))


def answer_nlls(model, params, tokenizer, examples: Sequence[instructions_lib.Example], *,
                batch_size: int = 64) -> list[float]:
  """Per example, the mean per-token NLL (nats) of the expected output and eos after the prompt,
  teacher-forced (causal models): a graded measure of what a model knows, where greedy accuracy
  is all or nothing. Rows are right-padded to one shape (one compile)."""
  from pathways_jax.eval.facts import log_probs  # pylint: disable=g-import-not-at-top
  if not examples:
    raise ValueError('no examples to score (an empty split)')
  seqs = [(list(prompt_tokens(tokenizer, e)), list(tokenizer.encode(e.answer)) + [
      tokenizer.eos_id]) for e in examples]
  width = max(len(p) + len(a) for p, a in seqs)
  if width > model.cfg.max_len:
    raise ValueError(f'a prompt and answer of {width} tokens exceed model.max_len='
                     f'{model.cfg.max_len}')
  batch_size = min(batch_size, len(seqs))
  nll = []
  for s in range(0, len(seqs), batch_size):
    chunk = seqs[s:s + batch_size]
    tokens_BL = np.full((batch_size, width), tokenizer.pad_id, np.int32)
    for i, (p, a) in enumerate(chunk):
      tokens_BL[i, :len(p) + len(a)] = p + a
    logp_BLV = np.asarray(log_probs(model, params, tokens_BL))
    for i, (p, a) in enumerate(chunk):
      at_L = np.arange(len(p) - 1, len(p) + len(a) - 1)  # the positions that predict the answer
      nll.append(-float(logp_BLV[i, at_L, a].mean()))
  return nll
