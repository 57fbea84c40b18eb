"""The post-training figures (instruction SFT, DPO, knowledge injection, GRPO, PAPRIKA, the
whole pathway), drawn from their data files; experiments/figures.py is the command line."""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from figure_data_posttrain import *  # pylint: disable=wildcard-import,unused-wildcard-import,wrong-import-position
from figure_style import _finish, _footer, _plt, _save, _seed_bars  # pylint: disable=wrong-import-position


def _lora_label(arm: str, trainable) -> str:
  also = arm[len('lora['):-1]
  what = {'': 'adapters only', 'embed': '+ embedding', 'embed|.*scale': '+ embedding + norms'}
  return f'LoRA r=8\n{what.get(also, "+ " + also)}\n({trainable:,} trained)'


def draw_instruction_sft(data: dict, path: str) -> str:
  plt = _plt()
  seeds = list(data['seeds'].values())
  loras = sorted({a for s in seeds for a in s if a.startswith('lora[')},
                 key=lambda a: -sum(s[a]['accuracy'] for s in seeds if a in s))
  arms = ['base', 'sft'] + loras
  labels = {'base': 'base\n(no SFT)', 'sft': f'full SFT\n({data["sft_trainable"]:,} trained)'}
  labels.update({a: _lora_label(a, next(s[a]['trainable'] for s in seeds if a in s))
                 for a in loras})
  fig, ax = plt.subplots(figsize=(8, 3.6))
  for i, m in enumerate(('format', 'accuracy')):
    xs = [j + (i - 0.5) * 0.38 for j in range(len(arms))]
    _seed_bars(ax, xs, [[s[a][m] for s in seeds if a in s] for a in arms], 0.38, f'C{i}',
               'format compliance' if m == 'format' else 'accuracy')
  ax.set_xticks(range(len(arms)), [labels[a] for a in arms], fontsize=7)
  ax.set_ylim(0, 1.05)
  ax.set_ylabel(f'held-out questions ({data["n"]})', fontsize=8)
  ax.set_title('SFT and LoRA on the instruction set (0.92M AR base, 800 steps; seeds as dots)',
               fontsize=8)
  ax.legend(fontsize=7)
  return _finish(fig, data, path)


def draw_dpo_instructions(data: dict, path: str) -> str:
  plt = _plt()
  seeds = list(data['seeds'].values())
  fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
  ax = axes[0]
  bars = [('SFT', 'sft', 'rpo'), ('DPO', '', 'dpo'), ('RPO\n(DPO + NLL)', '', 'rpo')]
  for i, m in enumerate(('train_questions', 'heldout')):
    xs = [j + (i - 0.5) * 0.38 for j in range(len(bars))]
    vals = [[s[arm][f'sft_{m}' if sft else m] for s in seeds] for _, sft, arm in bars]
    _seed_bars(ax, xs, vals, 0.38, f'C{i}',
               'training questions' if i == 0 else 'held-out questions')
  ax.set_xticks(range(len(bars)), [b[0] for b in bars], fontsize=7)
  ax.set_ylabel('greedy accuracy', fontsize=8)
  ax.set_ylim(0, 1.0)
  ax.set_title("DPO on the SFT model's own right vs wrong answers", fontsize=8)
  ax.legend(fontsize=7)
  ax = axes[1]
  for i, arm in enumerate(DPO_ARMS):
    for k, s in enumerate(seeds):
      xs, ys = zip(*s[arm]['logps_chosen'])
      ax.plot(xs, ys, color=f'C{i + 2}', lw=1, marker='.', ms=3,
              label=('DPO' if arm == 'dpo' else 'RPO') if k == 0 else None)
  ax.set_xlabel('step', fontsize=8)
  ax.set_ylabel('chosen answer log-prob (held-out pairs)', fontsize=8)
  ax.set_title('Likelihood displacement: the chosen answers fall under DPO', fontsize=8)
  ax.legend(fontsize=7)
  return _finish(fig, data, path)


KI_LABELS = {'prompt': 'prompt\n(no training)', 'static': 'static\n(full FT)',
             'modular': 'modular\n(LoRA r=8)', 'dynamic': 'dynamic\n(BM25 + prompt)'}


def draw_knowledge_injection(data: dict, path: str) -> str:
  plt = _plt()
  seeds = list(data['seeds'].values())
  fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
  panels = ((axes[0], ('new_accuracy', 'old_accuracy'), 'accuracy (greedy, lenient format)',
             f'Accuracy: new facts ({data["n_new"]} questions, unseen phrasing), old facts '
             f'({data["n_old"]})'),
            (axes[1], ('new_nll', 'old_nll'), 'answer NLL (nats/token, lower is better)',
             'Teacher-forced NLL of the right answer'))
  for ax, measures, ylabel, title in panels:
    for i, m in enumerate(measures):
      xs = [j + (i - 0.5) * 0.38 for j in range(len(KI_ARMS))]
      means = [sum(s[a][m] for s in seeds) / len(seeds) for a in KI_ARMS]
      bars = ax.bar(xs, means, 0.38, color=f'C{i}', alpha=0.8,
                    label=('new facts' if m.startswith('new') else 'old facts (retention)'))
      ax.bar_label(bars, labels=[f'{v:.2f}' for v in means], fontsize=6, padding=1)
      for x, a in zip(xs, KI_ARMS):
        ax.plot([x] * len(seeds), [s[a][m] for s in seeds], 'k.', ms=3)
    ax.set_xticks(range(len(KI_ARMS)), [KI_LABELS[a] for a in KI_ARMS], fontsize=7)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.set_title(title, fontsize=8)
    ax.legend(fontsize=7)
  axes[0].set_ylim(0, 1.1)
  return _finish(fig, data, path)


GRPO_LABELS = {'sft': 'SFT (start)', 'grpo': 'GRPO\n(correct)', 'grpo_random': 'GRPO\n(random)',
               'grpo_format_only': 'GRPO\n(format only)', 'grpo_wd1': 'wd1\n(correct)'}


def draw_grpo_instructions(data: dict, path: str) -> str:
  plt = _plt()
  seeds = list(data['seeds'].values())
  arms = ('sft',) + GRPO_ARMS
  fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
  ax = axes[0]
  for i, m in enumerate(('train_questions', 'heldout')):
    xs = [j + (i - 0.5) * 0.38 for j in range(len(arms))]
    means = [sum(s[a][m] for s in seeds) / len(seeds) for a in arms]
    bars = ax.bar(xs, means, 0.38, color=f'C{i}', alpha=0.8,
                  label='training questions' if i == 0 else 'held-out questions')
    ax.bar_label(bars, labels=[f'{v:.2f}' for v in means], fontsize=6, padding=1)
    for x, a in zip(xs, arms):
      ax.plot([x] * len(seeds), [s[a][m] for s in seeds], 'k.', ms=3)
  ax.set_xticks(range(len(arms)), [GRPO_LABELS[a] for a in arms], fontsize=7)
  ax.set_ylabel('greedy accuracy', fontsize=8)
  ax.set_ylim(0, 1.0)
  ax.set_title(f'Accuracy after 150 steps ({data["n"]} questions each)', fontsize=8)
  ax.legend(fontsize=7)
  ax = axes[1]
  for i, arm in enumerate(GRPO_ARMS):
    for k, s in enumerate(seeds):
      xs, ys = zip(*s[arm]['reward'])
      ax.plot(xs, ys, color=f'C{i + 2}', lw=1, alpha=0.8,
              label=GRPO_LABELS[arm].replace('\n', ' ') if k == 0 else None)
  ax.set_xlabel('step', fontsize=8)
  ax.set_ylabel('mean reward of the sampled answers', fontsize=8)
  ax.set_title('Training reward (each arm its own reward; one line per seed)', fontsize=8)
  ax.legend(fontsize=7)
  return _finish(fig, data, path)


def draw_grpo_arithmetic(data: dict, path: str) -> str:
  """grpo_arithmetic and grpo_arithmetic_long (whose seeds may hold a wd1 arm)."""
  plt = _plt()
  seeds = data['seeds']
  fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
  ax = axes[0]
  arms = [a for a in ('sft',) + ARITH_ARMS if any(a in s for s in seeds.values())]
  for i, m in enumerate(('train_questions', 'heldout')):
    xs = [j + (i - 0.5) * 0.38 for j in range(len(arms))]
    vals = [[s[a][m] for s in seeds.values() if a in s] for a in arms]
    _seed_bars(ax, xs, vals, 0.38, f'C{i}',
               'training questions' if i == 0 else 'held-out questions')
  ax.set_xticks(range(len(arms)), [GRPO_LABELS[a] for a in arms], fontsize=7)
  ax.set_ylabel('greedy accuracy (arithmetic)', fontsize=8)
  wd1 = 'grpo_wd1' in arms
  ax.set_ylim(0, 1.2 if wd1 else 1.0)  # room for the legend above four arms' bars
  ax.set_title(f'Arithmetic questions only, after {data.get("grpo_steps") or 150} steps '
               f'({data["n"]} each)', fontsize=8)
  ax.legend(fontsize=7, **({'ncol': 2, 'loc': 'upper left'} if wd1 else {}))
  ax = axes[1]
  for k, (seed, s) in enumerate(sorted(seeds.items())):
    for arm, style in (('grpo', '-'), ('grpo_wd1', '--')):
      if arm in s:
        xs, ys = zip(*([[0, s['sft']['heldout']]] + s[arm]['val_correct']))
        ax.plot(xs, ys, color=f'C{k}', ls=style, marker='.', lw=1,
                label=f'seed {seed}' + (' wd1' if arm == 'grpo_wd1' else ''))
  ax.set_xlabel('step', fontsize=8)
  ax.set_ylabel('held-out accuracy (greedy)', fontsize=8)
  ax.set_ylim(0, 1.0)
  ax.set_title('Held-out arithmetic during training: GRPO (solid), wd1 (dashed)' if wd1 else
               'GRPO (correct reward): held-out arithmetic during training', fontsize=8)
  ax.legend(fontsize=7)
  return _finish(fig, data, path)


def draw_grpo_arithmetic_unseen(data: dict, path: str) -> str:
  """SFT -> GRPO on training questions and on held-out problems (never asked in training),
  these split by whether the pretraining corpus works them out; the training reward."""
  plt = _plt()
  seeds = data['seeds']
  fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
  ax = axes[0]
  rate = lambda c: c[0] / c[1]
  cols = (('training questions', lambda s: s['train_questions']),
          ('held-out problems', lambda s: s['heldout']),
          ('... not in the corpus', lambda s: rate(s['problems']['problem/not_in_corpus'])),
          ('... in the corpus', lambda s: rate(s['problems']['problem/in_corpus'])))
  for i, arm in enumerate(('sft', 'grpo')):
    xs = [j + (i - 0.5) * 0.38 for j in range(len(cols))]
    _seed_bars(ax, xs, [[f(s[arm]) for s in seeds.values()] for _, f in cols], 0.38, f'C{i}',
               GRPO_LABELS[arm].replace('\n', ' '))
  first = next(iter(seeds.values()))['grpo']['problems']
  ax.set_xticks(range(len(cols)), [
      c if k < 2 else f'{c}\n({first[g][1]})' for k, (c, _) in enumerate(cols)
      for g in [('problem/not_in_corpus', 'problem/in_corpus')[max(k - 2, 0)]]], fontsize=7)
  ax.set_ylabel('greedy accuracy (arithmetic)', fontsize=8)
  ax.set_ylim(0, 0.7)
  ax.set_title(f'Held out by problem: {data["n"]} questions on problems training never asks, '
               f'after {data.get("grpo_steps")} steps', fontsize=8)
  ax.legend(fontsize=7)
  ax = axes[1]
  for k, (seed, s) in enumerate(sorted(seeds.items())):
    xs, ys = zip(*s['grpo']['reward'])
    ax.plot(xs, ys, color=f'C{k}', marker='.', lw=1, label=f'seed {seed}: training reward')
    xs, ys = zip(*([[0, s['sft']['heldout']]] + s['grpo']['val_correct']))
    ax.plot(xs, ys, color=f'C{k}', ls='--', lw=1, label=f'seed {seed}: held-out (first 128)')
  ax.set_xlabel('step', fontsize=8)
  ax.set_ylabel('accuracy', fontsize=8)
  ax.set_ylim(0, 0.7)
  ax.set_title('GRPO (correct reward): sampled training reward, greedy held-out', fontsize=8)
  ax.legend(fontsize=6, ncol=2)
  return _finish(fig, data, path)


def draw_paprika(data: dict, path: str) -> str:
  plt = _plt()
  seeds = list(data['seeds'].values())
  held = data['heldout_game']
  games = sorted(seeds[0]['eval']['base'], key=lambda g: (g == held, g))
  labels = [f'{g}\n(held out)' if g == held else g for g in games]
  fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
  names = {'base': 'base (random play)', 'sft': 'PAPRIKA SFT', 'rpo': 'PAPRIKA SFT + RPO'}
  for ax, key, title in ((axes[0], 'success_rate', 'success rate'),
                         (axes[1], 'consistent_rate', 'consistent moves / moves')):
    for i, arm in enumerate(PAPRIKA_ARMS):
      xs = [j + (i - 1) * 0.27 for j in range(len(games))]
      _seed_bars(ax, xs, [[s['eval'][arm][g][key] for s in seeds] for g in games], 0.27,
                 f'C{i}', names[arm])
    for j, g in enumerate(games):  # uniformly random legal moves: the chance level
      ax.hlines(data['random'][g][key], j - 0.42, j + 0.42, colors='k', linestyles=':', lw=1,
                label='random legal moves' if j == 0 else None)
    ax.set_xticks(range(len(games)), labels, fontsize=7)
    ax.set_ylim(0, 1.0)
    ax.set_title(f'{title} (sampled play at temperature {data["sampling"]["eval_temperature"]})',
                 fontsize=8)
    ax.legend(fontsize=6)
  ax = axes[2]
  train_games = sorted(seeds[0]['diversity']['min_p'])
  metrics = (('distinct_first_moves', 'distinct 1st'), ('illegal_rate', 'illegal'),
             ('success_rate', 'success'))
  for i, mode in enumerate(('min_p', 'plain')):
    pairs = [(g, m) for g in train_games for m in metrics]
    ticks = [f'{PAPRIKA_SHORT.get(g, g)}\n{name}' for g, (_, name) in pairs]
    _seed_bars(ax, [j + (i - 0.5) * 0.38 for j in range(len(pairs))],
               [[s['diversity'][mode][g][k] for s in seeds] for g, (k, _) in pairs], 0.38,
               f'C{i + 3}', f'min-p {data["sampling"]["min_p"]}' if mode == 'min_p' else 'plain',
               fontsize=5)
  ax.set_xticks(range(len(ticks)), ticks, fontsize=5)
  ax.set_ylim(0, 1.05)
  ax.set_title(f'the base at temperature {data["sampling"]["temperature"]}: min-p vs plain '
               'sampling', fontsize=8)
  ax.legend(fontsize=6)
  return _finish(fig, data, path)


PATHWAY_LABELS = {'base': 'base', 'sft': 'SFT', 'dpo': 'DPO', 'grpo': 'GRPO', 'grpo_random':
                  'GRPO\nrandom', 'grpo_format_only': 'GRPO\nformat only',
                  'llada_base': 'base', 'llada_sft': 'SFT', 'llada_vrpo': 'VRPO',
                  'llada_grpo': 'diffu-\nGRPO'}


def draw_pathway(data: dict, path: str) -> str:
  plt = _plt()
  seeds = list(data['seeds'].values())
  stages = [s for s in PATHWAY_STAGES if all(s in x for x in seeds)]
  fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), gridspec_kw={'width_ratios': [3, 2]})
  ax = axes[0]
  for i, (key, label) in enumerate((('accuracy', 'held-out accuracy'),
                                    ('format', 'format compliance'))):
    xs = [j + (i - 0.5) * 0.38 for j in range(len(stages))]
    _seed_bars(ax, xs, [[x[s][key] for x in seeds] for s in stages], 0.38, f'C{i}', label)
  llada = [j for j, s in enumerate(stages) if s.startswith('llada')]
  if llada and len(llada) < len(stages):
    ax.axvline(llada[0] - 0.5, color='gray', lw=0.8, ls='--')
    ax.text(llada[0] - 0.4, 1.02, 'LLaDA', fontsize=7, color='gray')
    ax.text(-0.4, 1.02, 'AR', fontsize=7, color='gray')
  ax.set_xticks(range(len(stages)), [PATHWAY_LABELS[s] for s in stages], fontsize=7)
  ax.set_ylim(0, 1.1)
  rm = [x['rm_pair_accuracy'] for x in seeds if x.get('rm_pair_accuracy') is not None]
  rm_text = (f'; reward model: {sum(rm) / len(rm):.2f} held-out pair accuracy' if rm else '')
  ax.set_title(f'Each stage from the one before, {data["n"]} held-out {data["kinds"] or "all"} '
               f'questions{rm_text}', fontsize=8)
  ax.legend(fontsize=7, loc='upper left', bbox_to_anchor=(0.0, 0.96))
  ax = axes[1]
  arms = sorted({a for x in seeds for a in x['reward']}, key=list(PATHWAY_STAGES).index)
  for i, arm in enumerate(arms):
    for k, x in enumerate(seeds):
      if arm in x['reward']:
        xs, ys = zip(*x['reward'][arm])
        ax.plot(xs, ys, color=f'C{i + 2}', lw=1, alpha=0.8,
                label=(('LLaDA ' if arm.startswith('llada') else '') +
                       PATHWAY_LABELS[arm].replace('-\n', '-').replace('\n', ' ')
                       if k == 0 else None))
  ax.set_xlabel('step', fontsize=8)
  ax.set_ylabel('mean reward of the sampled answers', fontsize=8)
  ax.set_title('RL stages: training reward (each arm its own reward; a line per seed)', fontsize=8)
  ax.legend(fontsize=7)
  return _finish(fig, data, path)


def draw_prorl(data: dict, path: str) -> str:
  """Held-out accuracy, KL and training reward: KL-regularised GRPO with ProRL's resets (solid)
  and without (dashed), one colour per seed; the resets as dotted lines."""
  plt = _plt()
  seeds = data['seeds']
  fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
  for k, (seed, s) in enumerate(sorted(seeds.items())):
    for arm, style in (('grpo_kl_reset', '-'), ('grpo_kl', '--')):
      label = f'seed {seed}' + (' reset' if arm == 'grpo_kl_reset' else ' no reset')
      val = [p for p in s[arm]['val_correct'] if p[0] > 0]
      xs, ys = zip(*([[0, s['sft']['heldout']]] + val))
      axes[0].plot(xs, ys, color=f'C{k}', ls=style, marker='.', lw=1, label=label)
      for ax, key in ((axes[1], 'kl'), (axes[2], 'reward')):
        if s[arm][key]:
          xs, ys = zip(*s[arm][key])
          ax.plot(xs, ys, color=f'C{k}', ls=style, lw=0.8, label=label)
  first = next(iter(seeds.values()))['grpo_kl_reset']
  for step in [p[0] for p in first['reference_reset']]:
    for ax in axes:
      ax.axvline(step, color='gray', ls=':', lw=0.7)
  titles = ('held-out arithmetic (greedy)', f'KL to the reference (k3, beta = {first["beta"]})',
            'training reward (sampled, T = 1)')
  for ax, title in zip(axes, titles):
    ax.set_xlabel('step', fontsize=8)
    ax.set_title(title, fontsize=8)
  axes[0].set_ylim(0, 1.0)
  axes[0].legend(fontsize=6)
  return _finish(fig, data, path)


RPT_LABELS = {'base': 'base', 'rpt': 'RPT\n(next-token reward)', 'rpt_random': 'coin reward',
              'ntp': 'continued\npretraining', 'sft_hard': 'supervised on\nthe same tokens'}


def draw_rpt(data: dict, path: str) -> str:
  """Greedy next-token accuracy and the true token's NLL of the base and each arm on held-out
  hard tokens, held-out ordinary tokens and the training prompts: seed means, seeds as dots."""
  plt = _plt()
  seeds = list(data['seeds'].values())
  fig, axes = plt.subplots(1, 2, figsize=(13, 3.8))
  sets = (('validation_hard', 'held-out hard tokens'),
          ('validation_random', 'held-out ordinary tokens'), ('train', 'training prompts'))
  # the exact match (the argmax is the true token) where the runs scored it
  exact = all('exact' in s['scores']['base']['validation_hard'] for s in seeds)
  for ax, key, ylabel in ((axes[0], 'exact' if exact else 'accuracy',
                           'greedy next-token accuracy' + (' (exact)' if exact else '')),
                          (axes[1], 'nll', "true token's NLL (nats)")):
    models = data['models']
    for i, (name, label) in enumerate(sets):
      xs = [j + (i - 1) * 0.27 for j in range(len(models))]
      _seed_bars(ax, xs, [[s['scores'][m][name][key] for s in seeds] for m in models],
                 0.27, f'C{i}', label)
    ax.set_xticks(range(len(models)), [RPT_LABELS[m] for m in models], fontsize=7)
    ax.set_ylabel(ylabel, fontsize=8)
  axes[0].set_title(f'Next-token accuracy after {data["steps"]} steps from the base', fontsize=8)
  axes[1].set_title('NLL of the true next token', fontsize=8)
  for ax in axes:  # room above the bars for the legend
    ax.set_ylim(0, ax.get_ylim()[1] * 1.2)
  axes[0].legend(fontsize=7, loc='upper center', ncol=3)
  return _finish(fig, data, path)
