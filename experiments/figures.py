"""The README's figures: one PNG per headline result, drawn from small committed data files.

    python experiments/figures.py                      # redraw docs/figures/*.png from the data
    python experiments/figures.py --rho1=runs/rho1 --gstack=runs/gstack --reversal=runs/reversal
    python experiments/figures.py --knowledge_injection=runs/ki_s0,runs/ki_s1,runs/ki_s2

With no run directory the figures are drawn from docs/results/data/<experiment>.json (curves,
final numbers, date, device, commit). A run directory given (a finished run of
experiments/<experiment>.py, the WORKDIR holding its results.json) first copies its numbers into
that data file, then draws from it, so a PNG and its data file always agree. `--data=DIR` writes
and reads the data files elsewhere (e.g. to look at a run without touching the committed ones).

  rho1.png      clean validation loss vs training tokens per arm (LLaDA arms in a second panel)
  gstack.png    validation loss vs training FLOPs per arm, the growth marked (LLaDA: second panel)
  gstack_study.png  (and gstack_study_llada.png: the same study with study.objective=diffusion)
                mean validation curves of scratch, the small models alone and the growth
                arms at equal FLOPs, and the speedup against d and g with the seeds as dots and
                the paper's numbers (experiments/gstack_study.py's WORKDIR)
  reversal.png  forward / reverse / held-out / infill / rank per model, mean over seeds with the
                seeds as dots, for the generated world and a facts file, and LLaDA per ablation
                (run directories, one per seed and setting, comma-separated)
  instruction_sft.png  held-out format compliance and accuracy of base, full SFT and each LoRA
                variant, seeds as dots (run directories, one per seed and LoRA setting)
  dpo_instructions.png  SFT / DPO / RPO accuracy per seed, and the held-out chosen log-prob
                during training (run directories, one per seed; or the per-seed summary
                docs/results/dpo_instructions.json)
  knowledge_injection.png  new- and old-fact accuracy and answer NLL per arm, seeds as dots
                (its run directories, one per seed, comma-separated)
  paprika.png   success and consistent-move rates per game for base / SFT / SFT + RPO, and
                min-p against plain sampling (one run directory per seed, comma-separated)
  pathway.png   held-out accuracy and format compliance after every stage of both chains of
                experiments/pathway.py, and the RL stages' reward (one run directory per seed)
  scaling.png   isoFLOP profiles of AR and LLaDA (loss vs size per budget, mean and sd over
                seeds), the fitted L*(C) laws with the compute multiplier, and the downstream
                task's held-out accuracy (experiments/scaling.py's WORKDIR)

The numbers side (extraction from run directories, the data files) is experiments/figure_data.py
(post-training: figure_data_posttrain.py);
the post-training drawings are experiments/figures_posttrain.py, the shared style
experiments/figure_style.py.
Needs only matplotlib (the `notebooks` or `test` extra), not JAX.
"""
from __future__ import annotations

import argparse
import os
import sys
import textwrap

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # figure_data.py, beside this file
# The data side (EXPERIMENTS, extract_<experiment>, load_data, save_data, MissingData, the arm
# names), re-exported so that `figures.load_data` and the rest work as before the split.
from figure_data import *  # pylint: disable=wildcard-import,unused-wildcard-import,wrong-import-position

OUT_DIR = os.path.join(REPO, 'docs', 'figures')


# ---------------------------------------------------------------------------------- drawing

from figure_style import DPI, _finish, _footer, _plt, _save, _seed_bars  # pylint: disable=wrong-import-position,unused-import
# The post-training figures live in their own module; named here for the registry and tests.
from figures_posttrain import *  # pylint: disable=wildcard-import,unused-wildcard-import,wrong-import-position


RHO1_LABELS = {'uniform': 'uniform', 'slm': 'SLM k=0.6', 'slm_seq': 'SLM per sequence',
               'random': 'random 60%', 'oracle': 'oracle (clean only)'}


def draw_rho1(data: dict, path: str) -> str:
  plt = _plt()
  fams = [('AR', data['autoregressive'])] + ([('LLaDA', data['llada'])] if 'llada' in data else [])
  fig, axes = plt.subplots(1, len(fams), figsize=(5 * len(fams), 3.6), squeeze=False)
  for ax, (title, fam) in zip(axes[0], fams):
    for i, (arm, a) in enumerate(fam['arms'].items()):
      xs, ys = zip(*a['curve'])
      sav = a.get('token_savings')
      extra = f', {sav:.2f}x' if sav and arm != 'uniform' else ''
      ax.plot([x / 1e6 for x in xs], ys, marker='.', ms=4, color=f'C{i}',
              label=f'{RHO1_LABELS.get(arm, arm)} ({a["final"]:.3f}{extra})')
    ax.axhline(fam['ref_val'], color='gray', ls=':', lw=1,
               label=f'reference ({fam["ref_val"]:.3f})')
    ax.set_xlabel('training tokens (M)')
    ax.grid(alpha=0.3)
    ax.set_ylabel('clean val loss (nats/byte)' if title == 'AR' else 'clean val loss (LLaDA bound)')
    noise = data.get('noise_fraction')
    ax.set_title(f'RHO-1, {title}' + (f': {noise:.0%} of the stream noise' if noise else ''),
                 fontsize=10)
    ax.legend(fontsize=7)
  fig.tight_layout(rect=(0, 0.03, 1, 1))
  _footer(fig, data)
  return _save(fig, path)


GSTACK_ORDER = ('scratch', 'stack', 'interleave', 'zero', 'stack_d0', 'small_only', 'llada_scratch',
                'llada_stack')


def draw_gstack(data: dict, path: str) -> str:
  plt = _plt()
  fams = [('AR', data['arms'])] + ([('LLaDA', data['llada'])] if data.get('llada') else [])
  fig, axes = plt.subplots(1, len(fams), figsize=(5 * len(fams), 3.6), squeeze=False)
  for ax, (title, arms) in zip(axes[0], fams):
    names = sorted(arms, key=lambda n: GSTACK_ORDER.index(n) if n in GSTACK_ORDER else 99)
    for i, name in enumerate(names):
      e = arms[name]
      pts = [tuple(p) for p in e['curve']]
      g = e.get('growth')
      if g and g.get('val_before') is not None:
        # The loss right before and after the growth: the jump shows on the curve.
        gf = g['flops']  # evaluations at the growth step come after it
        pts = ([p for p in pts if p[0] < gf] + [(gf, g['val_before']), (gf, g['val_after'])] +
               [p for p in pts if p[0] >= gf])
      sp = e.get('speedup')
      label = f'{name.replace("llada_", "")} ({e["final"]:.3f}'
      if not name.endswith(('scratch', 'small_only')):
        label += ', never' if sp is None else f', {sp:+.2f}'
      label += ')'
      xs, ys = zip(*pts)
      ax.plot(xs, ys, marker='.', ms=4, color=f'C{i}', label=label)
      if g:
        ax.plot(g['flops'], g.get('val_after') or ys[0], marker='v', ms=7, color=f'C{i}',
                ls='none')
    scratch = arms.get('scratch') or arms.get('llada_scratch')
    if scratch:
      ax.axhline(scratch['final'], color='gray', ls=':', lw=1, label="scratch's final")
      # An untrained model stacked (stack_d0) starts near log(256): cut it off above
      # scratch's first evaluation so the differences at the end stay readable.
      lo, hi = ax.get_ylim()
      ax.set_ylim(lo, min(hi, scratch['curve'][0][1] + 0.15))
    ax.set_xlabel('training FLOPs')
    ax.grid(alpha=0.3)
    ax.set_ylabel('val loss (nats/byte)' if title == 'AR' else 'val loss (LLaDA bound)')
    ax.set_title(f'G_stack, {title}: {data.get("small_layers")}L grown to '
                 f'{data.get("target_layers")}L (v: growth; final, speedup)', fontsize=9)
    ax.legend(fontsize=7)
  fig.tight_layout(rect=(0, 0.03, 1, 1))
  _footer(fig, data)
  return _save(fig, path)


def _study_arm(name: str):
  """'stack_g4_d0.1' -> (4, 0.1); 'small_g4' -> (4, None); 'scratch' -> (None, None)."""
  if name.startswith('stack_g'):
    g, x = name[len('stack_g'):].split('_d')
    return int(g), float(x)
  if name.startswith('small_g'):
    return int(name[len('small_g'):]), None
  return None, None


def draw_gstack_study(data: dict, path: str) -> str:
  plt = _plt()
  arms = data['arms']
  fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4))
  for i, (name, a) in enumerate(arms.items()):
    g, x = _study_arm(name)
    style = {'color': f'C{i}', 'lw': 1.8 if name == 'scratch' else 1.0,
             'ls': '--' if name.startswith('small') else '-'}
    xs, ys = zip(*a['curve'])
    label = f'{name}: {a["final"]["mean"]:.3f}'
    if 'speedup' in a and a['speedup']['mean'] is not None:
      label += f' ({a["speedup"]["mean"]:+.2f})'
    ax.plot(xs, ys, label=label, **style)
    if a.get('growth'):
      ax.plot(a['growth']['flops'], min(ys), marker='v', ms=6, color=f'C{i}', ls='none')
  scratch = arms['scratch']
  ax.axhline(scratch['final']['mean'], color='gray', ls=':', lw=1)
  lo = min(a['final']['mean'] for a in arms.values())
  ax.set_ylim(lo - 0.05, scratch['curve'][len(scratch['curve']) // 4][1])  # the last 3/4
  ax.set_xlabel('training FLOPs')
  llada = ' LLaDA' if data.get('objective') == 'diffusion' else ''
  ax.set_ylabel(f'val loss ({"LLaDA bound, " if llada else ""}nats/byte), mean over seeds')
  ax.set_title(f'{data["target"]}{llada} target at {data["budget_flops"]:.0e} FLOPs '
               "(final; speedup; v: growth)", fontsize=9)
  ax.legend(fontsize=6)
  ax.grid(alpha=0.3)
  by_g = {}
  for name, a in arms.items():
    g, x = _study_arm(name)
    if x is not None:
      by_g.setdefault(g, []).append((x, a))
  for j, (g, pts) in enumerate(sorted(by_g.items(), reverse=True)):
    pts.sort(key=lambda p: p[0])
    xs = [p[0] * (1 + 0.04 * j) for p in pts]  # g = 2 a little to the right of g = 4
    bx.plot(xs, [p[1]['vs_scratch']['mean'] for p in pts], marker='o', color=f'C{j}',
            label=f'g = {g}: mean over seeds')
    for xv, (_, a) in zip(xs, pts):
      bx.plot([xv] * len(a['vs_scratch_seeds']), a['vs_scratch_seeds'], 'k.', ms=3)
      sp = a['speedup']
      text = 'never' if sp['mean'] is None else f'{sp["mean"]:+.2f}'
      bx.annotate(f'{text} ({a["reached"]}/{len(a["speedups"])})', (xv, a['vs_scratch']['mean']),
                  textcoords='offset points', xytext=(4, 4), fontsize=6, color=f'C{j}')
  bx.axhline(0, color='gray', ls=':', lw=1)
  ds = sorted({x for pts in by_g.values() for x, _ in pts})
  bx.set_xscale('log')
  bx.set_xticks(ds, [f'{x:.1%}' for x in ds])
  bx.minorticks_off()
  bx.set_xlabel('d / D (small-model tokens over scratch tokens)')
  bx.set_ylabel("final loss minus scratch's (same seed)")
  paper = ', '.join(f'{k} {v:+.1%}' for k, v in data['paper_speedups'].items())
  bx.set_title(f'below 0: growth better; text: speedup (seeds reaching scratch)\n'
               f'paper: {paper}', fontsize=8)
  bx.legend(fontsize=6)
  bx.grid(alpha=0.3)
  return _finish(fig, data, path)


REVERSAL_LABELS = {'ar': 'AR', 'llada': 'LLaDA', 'llada_control': 'LLaDA control'}
REVERSAL_BARS = (('forward', 'forward'), ('forward_heldout', 'forward\n(held-out)'),
                 ('reverse', 'reverse'), ('reverse_heldout', 'reverse\n(held-out)'),
                 ('infill_reverse', 'infill\nname'), ('rank_reverse', 'rank\n(top-1)'))


def _reversal_panel(ax, setting: dict, title: str):
  """Mean over seeds per metric and model (bar) and the seeds themselves (dots)."""
  summary = setting['summary']
  width = 0.8 / max(1, len(summary))
  for i, (model, metrics) in enumerate(summary.items()):
    xs = [j + (i - (len(summary) - 1) / 2) * width for j in range(len(REVERSAL_BARS))]
    means = [metrics[k]['mean'] for k, _ in REVERSAL_BARS]
    bars = ax.bar(xs, [m or 0.0 for m in means], width, color=f'C{i}', alpha=0.85,
                  label=REVERSAL_LABELS.get(model, model))
    ax.bar_label(bars, labels=['' if m is None else f'{m:.2f}' for m in means], fontsize=5,
                 padding=1)
    for x, (k, _) in zip(xs, REVERSAL_BARS):
      vals = [per[model][k] for per in setting['seeds'].values()
              if model in per and per[model][k] is not None]
      ax.plot([x] * len(vals), vals, 'k.', ms=2.5)
  ax.set_xticks(range(len(REVERSAL_BARS)), [label for _, label in REVERSAL_BARS], fontsize=7)
  ax.set_ylim(0, 1.3)
  ax.set_yticks([0, 0.2, 0.4, 0.6, 0.8, 1.0])
  counts = {m: sum(m in per for per in setting['seeds'].values()) for m in summary}
  seeds = ', '.join(f'{REVERSAL_LABELS.get(m, m)} {n}' for m, n in counts.items())
  ax.set_ylabel(f'exact match / top-1 ({setting.get("num_test")} test people)', fontsize=8)
  ax.set_title(f'{title}: mean over seeds ({seeds}); dots: each seed', fontsize=8)
  ax.legend(fontsize=6.5, loc='upper center', ncol=len(summary), frameon=False)


def draw_reversal(data: dict, path: str) -> str:
  plt = _plt()
  settings = data['settings']
  facts = [k for k in settings if k.startswith('facts file') and ',' not in k]
  ablations = [k for k in settings if k != 'default' and k not in facts]
  panels = ([('default', 'Generated world')] if 'default' in settings else []) + [
      (k, k.capitalize()) for k in facts[:1]]
  ncols = len(panels) + bool(ablations)
  fig, axes = plt.subplots(1, ncols, figsize=(5.2 * ncols, 3.8), squeeze=False)
  for ax, (key, title) in zip(axes[0], panels):
    _reversal_panel(ax, settings[key], title)
  if ablations:  # LLaDA's forward and reverse per setting, the default beside them
    ax = axes[0][-1]
    # Each lever beside the setting it changed: the generated world's, then the facts file's.
    names = (['default'] if 'default' in settings else []) + [
        k for k in ablations if not k.startswith('facts file')]
    for f in facts:
      names += [f] + [k for k in ablations if k.startswith(f + ',')]
    for i, (k, label) in enumerate((('forward', 'forward'), ('reverse', 'reverse'),
                                    ('reverse_heldout', 'reverse (held-out)'))):
      vals = [settings[n]['summary'].get('llada', {}).get(k, {}).get('mean') or 0.0 for n in names]
      ys = [j + (i - 1) * 0.27 for j in range(len(names))]
      bars = ax.barh(ys, vals, 0.27, color=f'C{i + 3}', label=label)
      ax.bar_label(bars, labels=[f'{v:.2f}' for v in vals], fontsize=5.5, padding=1)
    seeds = [len(settings[n]['seeds']) for n in names]
    label = lambda n, s: textwrap.fill(f'{n.replace(", ", ": ", 1) if n.startswith("facts") else n}'
                                       f' ({s} seed{"s" * (s > 1)})', 30)
    ax.set_yticks(range(len(names)), [label(n, s) for n, s in zip(names, seeds)], fontsize=6.5)
    ax.invert_yaxis()
    ax.set_xlim(0, 1.45)  # room for the legend right of the bars
    ax.set_xticks([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    ax.set_xlabel('LLaDA exact match (mean over the seeds run)', fontsize=8)
    ax.set_title('What made the difference (one lever changed)', fontsize=9)
    ax.legend(fontsize=6.5, loc='lower right')
  fig.tight_layout(rect=(0, 0.03, 1, 1))
  _footer(fig, data)
  return _save(fig, path)


def draw_scaling(data: dict, path: str) -> str:
  plt = _plt()
  pts = data['points']
  budgets = sorted({p['budget'] for p in pts})
  has_task = any(p['task'] for p in pts)
  fig, axes = plt.subplots(1, 3 if has_task else 2, figsize=(13 if has_task else 9, 3.8))
  names = {'autoregressive': 'AR', 'diffusion': 'LLaDA'}
  styles = {'autoregressive': '-', 'diffusion': '--'}
  ax = axes[0]
  for o in names:
    for i, b in enumerate(budgets):
      row = sorted((p for p in pts if p['objective'] == o and p['budget'] == b),
                   key=lambda p: p['params'])
      if not row:
        continue
      ax.errorbar([p['params'] for p in row], [p['loss']['mean'] for p in row],
                  yerr=[p['loss']['sd'] or 0 for p in row], color=f'C{i}', ls=styles[o],
                  marker='o', ms=3, lw=1, capsize=2, label=f'{names[o]} {b:.0e} FLOPs')
    for m in data['minima'].get(o, []):
      ax.plot([m['params']], [m['loss']], marker='*', ms=9, color='k', ls='none')
  ax.set_xscale('log')
  ax.xaxis.set_minor_formatter(_plt().NullFormatter())
  ax.set_xlabel('non-embedding parameters N', fontsize=8)
  ax.set_ylabel('validation loss (nats/byte)', fontsize=8)
  ax.set_title('isoFLOP profiles (* the fitted minimum)', fontsize=8)
  lo, hi = ax.get_ylim()
  ax.set_ylim(lo, hi + 0.3 * (hi - lo))  # room for the legend above the curves
  ax.legend(fontsize=5.5, ncol=2, loc='upper right', framealpha=0.6)
  ax = axes[1]
  for j, o in enumerate(names):
    ms = data['minima'].get(o, [])
    if not ms:
      continue
    cs = [m['budget'] for m in ms]
    ax.plot(cs, [m['loss'] for m in ms], 'o', color=f'C{j + 3}')
    law = data['laws'].get(o)
    if law:
      grid = [min(budgets) * (max(budgets) * 30 / min(budgets)) ** (k / 40) for k in range(41)]
      ax.plot(grid, [law['a'] * c ** -law['b'] for c in grid], styles[o], color=f'C{j + 3}',
              label=f'{names[o]}: L* = {law["a"]:.3g} C^-{law["b"]:.3f}')
  ax.set_xscale('log')
  ax.set_xlabel('training FLOPs C', fontsize=8)
  ax.set_ylabel('loss-optimal validation loss L*', fontsize=8)
  mult = ', '.join(f'{m["multiplier"]:.1f}x' + ('*' if m['extrapolated'] else '')
                   for m in data['multiplier'])
  ax.set_title(f'LLaDA/AR compute multiplier at AR\'s budgets:\n{mult}'
               + (' (* extrapolated)' if any(m['extrapolated'] for m in data['multiplier'])
                  else ''), fontsize=8)
  ax.legend(fontsize=7)
  if has_task:
    ax = axes[2]
    for j, o in enumerate(names):
      best = []
      for b in budgets:
        row = [p for p in pts if p['objective'] == o and p['budget'] == b and p['task']]
        if row:
          top = max(row, key=lambda p: p['task']['mean'])
          best.append((b, top['task']['mean'], top['task']['sd'] or 0))
      if best:
        xs, ys, es = zip(*best)
        ax.errorbar(xs, ys, yerr=es, color=f'C{j + 3}', ls=styles[o], marker='o', capsize=2,
                    label=names[o])
    ax.set_xscale('log')
    ax.xaxis.set_minor_formatter(_plt().NullFormatter())
    ax.set_xlabel('training FLOPs C', fontsize=8)
    ax.set_ylabel('held-out accuracy (best size)', fontsize=8)
    ax.set_title(f'Downstream: held-out {data["task"]} problems, own sampler', fontsize=8)
    ax.legend(fontsize=7)
  fig.tight_layout(rect=(0, 0.03, 1, 1))
  _footer(fig, {**data, 'device': f'{data.get("device")}, {data["seeds"]} seeds'})
  return _save(fig, path)


EXTRACT = {'rho1': extract_rho1, 'gstack': extract_gstack,
           'gstack_study': extract_gstack_study,
           'gstack_study_llada': lambda run_dirs, commit=None: {  # the same study, LLaDA's arms
               **extract_gstack_study(run_dirs, commit), 'experiment': 'gstack_study_llada'},
           'reversal': extract_reversal,
           'instruction_sft': extract_instruction_sft,
           'dpo_instructions': extract_dpo_instructions,
           'knowledge_injection': extract_knowledge_injection,
           'grpo_instructions': extract_grpo_instructions,
           'grpo_arithmetic': extract_grpo_arithmetic,
           'grpo_arithmetic_long': extract_grpo_arithmetic_long,
           'grpo_arithmetic_unseen': extract_grpo_arithmetic_unseen, 'paprika': extract_paprika,
           'pathway': extract_pathway, 'scaling': extract_scaling, 'prorl': extract_prorl,
           'rpt': extract_rpt}
DRAW = {'rho1': draw_rho1, 'gstack': draw_gstack, 'gstack_study': draw_gstack_study,
        'gstack_study_llada': draw_gstack_study,
        'reversal': draw_reversal,
        'instruction_sft': draw_instruction_sft, 'dpo_instructions': draw_dpo_instructions,
        'knowledge_injection': draw_knowledge_injection,
        'grpo_instructions': draw_grpo_instructions,
        'grpo_arithmetic': draw_grpo_arithmetic, 'grpo_arithmetic_long': draw_grpo_arithmetic,
        'grpo_arithmetic_unseen': draw_grpo_arithmetic_unseen,
        'paprika': draw_paprika,
        'pathway': draw_pathway, 'scaling': draw_scaling, 'prorl': draw_prorl,
        'rpt': draw_rpt}


def make_figures(run_dirs: dict | None = None, *, data_dir: str = DATA_DIR, out_dir: str = OUT_DIR,
                 only=EXPERIMENTS, commit: str | None = None) -> list[str]:
  """Copies the given runs' numbers into data files, then draws every figure in `only`."""
  for name, run_dir in (run_dirs or {}).items():
    if run_dir:
      save_data(name, EXTRACT[name](run_dir, commit), data_dir)
  data = {name: load_data(name, data_dir) for name in only}  # all found before any is drawn
  return [DRAW[name](d, os.path.join(out_dir, f'{name}.png')) for name, d in data.items()]


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  for name in EXPERIMENTS:
    ap.add_argument(f'--{name}', default='', metavar='RUN_DIR',
                    help=f'a finished run of its experiment (knowledge_injection, paprika and '
                         'the grpo ones: one per seed, comma-separated; grpo_arithmetic(_long): '
                         'experiments/grpo_instructions.py with grpo_exp.kinds=arithmetic): '
                         'copy its numbers into the data file')
  ap.add_argument('--data', default=DATA_DIR,
                  help='where the data files are (default: %(default)s)')
  ap.add_argument('--out', default=OUT_DIR, help='where the PNGs go (default: %(default)s)')
  ap.add_argument('--only', default='',
                  help='comma-separated experiments to draw (default: every one with a data file '
                       'or a run directory given)')
  ap.add_argument('--commit', default=None,
                  help="the commit the runs were made at (default: this checkout's HEAD)")
  args = ap.parse_args(argv)
  run_dirs = {n: getattr(args, n) for n in EXPERIMENTS}
  if args.only:
    only = [n.strip() for n in args.only.split(',') if n.strip()]
    bad = [n for n in only if n not in EXPERIMENTS]
    if bad:
      ap.error(f'--only: unknown experiment(s) {bad}; known: {EXPERIMENTS}')
  else:
    only = [n for n in EXPERIMENTS
            if run_dirs[n] or os.path.isfile(os.path.join(args.data, f'{n}.json'))]
    if not only:  # nothing at all: the error below names the first missing file
      only = list(EXPERIMENTS)
    for n in EXPERIMENTS:
      if n not in only:
        print(f'figures: {n} skipped, no {os.path.join(args.data, n)}.json', file=sys.stderr)
  try:
    paths = make_figures(run_dirs, data_dir=args.data, out_dir=args.out, only=only,
                         commit=args.commit)
  except MissingData as e:
    print(f'figures: {e}', file=sys.stderr)
    return 1
  for p in paths:
    print(f'{p} ({os.path.getsize(p) // 1024} KB)')
  return 0


if __name__ == '__main__':
  sys.exit(main())
