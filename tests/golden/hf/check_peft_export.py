"""PEFT loads adapters exported by `pathways_jax.interop.hf.save_adapter` and computes what we do.

Two halves, in two venvs (the project's has no torch; the golden one has torch + peft):

    .venv/bin/python tests/golden/hf/check_peft_export.py export OUT
    .venv-golden/bin/python tests/golden/hf/check_peft_export.py check OUT

`export` writes, under OUT, one adapter directory per case and `<case>.json` (its base case and
where the expected logits are):
  - the peft-made golden adapters (tests/golden/hf/peft/*) imported with `load_adapter` and
    exported again with `save_adapter`: expected = peft's own golden logits;
  - `ours_llama`: adapters made here (lora.init, then random nonzero A and B) on the golden llama,
    on q/v of every block and the second block's down projection only (so target_modules lists
    full module names), rank 3, alpha 6: expected = our Transformer's logits, in `<case>.npz`;
  - `ours_llama_rm`: a LoRA reward model made here on the golden llama_rm (random adapters on
    q/v, a random head with bias 0.5), saved with its head (PEFT's SEQ_CLS layout): expected =
    our rewards at each row's last non-pad token minus the bias (PEFT's score has none).
`check` loads each with `peft.PeftModel.from_pretrained` on the golden base checkpoint and
compares logits (<= 1e-4, the interop's promise); it also fails if peft adapts other modules than
the file holds or reports missing or unexpected adapter keys.
"""
import json
import os
import sys
import warnings

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
TOLERANCE = 1e-4


def export(out: str) -> int:
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from pathways_jax.adapters import lora  # pylint: disable=g-import-not-at-top
  from pathways_jax.interop import hf  # pylint: disable=g-import-not-at-top
  from pathways_jax.models.transformer import Transformer  # pylint: disable=g-import-not-at-top
  os.makedirs(out)
  for case in sorted(os.listdir(os.path.join(HERE, 'peft'))):
    src = os.path.join(HERE, 'peft', case)
    base = json.load(open(os.path.join(src, 'adapter_config.json')))['base_model_name_or_path']
    base_case = os.path.basename(base)
    _, cfg, _ = hf.load_pretrained(os.path.join(HERE, base_case), tokenizer=False)
    lora_params, lcfg = hf.load_adapter(src, cfg)
    hf.save_adapter(lora_params, lcfg, cfg, os.path.join(out, case), base_model_name_or_path=base,
                    head=hf.load_adapter_head(src, cfg))  # a SEQ_CLS adapter's head, or None
    with open(os.path.join(out, case + '.json'), 'w') as f:
      json.dump({'base': base_case, 'expected': os.path.join(src, 'golden.npz')}, f)
  # Adapters of our own, where peft never made any.
  params, cfg, _ = hf.load_pretrained(os.path.join(HERE, 'llama'), tokenizer=False)
  lcfg = lora.LoraConfig(rank=3, alpha=6.0, targets=r'attn/w[qv]|blocks_1/mlp/w_down')
  adapters = lora.init(jax.random.key(0), params, lcfg)
  leaves, tree = jax.tree_util.tree_flatten(adapters)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  adapters = jax.tree_util.tree_unflatten(tree, [
      0.5 * jax.random.normal(k, x.shape) / x.shape[0] ** 0.5 for k, x in zip(keys, leaves)])
  tokens = np.load(os.path.join(HERE, 'peft', 'llama_lora', 'golden.npz'))['tokens']
  logits = Transformer(lcfg.apply_to(cfg)).apply({'params': lora.combine(params, adapters)},
                                                 jnp.asarray(tokens))
  hf.save_adapter(adapters, lcfg, cfg, os.path.join(out, 'ours_llama'),
                  base_model_name_or_path='tests/golden/hf/llama')
  np.savez(os.path.join(out, 'ours_llama.npz'), tokens=tokens, logits=np.asarray(logits))
  with open(os.path.join(out, 'ours_llama.json'), 'w') as f:
    json.dump({'base': 'llama', 'expected': os.path.join(out, 'ours_llama.npz')}, f)
  # A LoRA reward model: adapters and a trained head (its bias is not PEFT's).
  params, cfg, _ = hf.load_pretrained(os.path.join(HERE, 'llama_rm'), tokenizer=False)
  lcfg = lora.LoraConfig(rank=3, alpha=6.0, targets=r'attn/w[qv]')
  adapters = lora.init(jax.random.key(2), params, lcfg)
  leaves, tree = jax.tree_util.tree_flatten(adapters)
  keys = jax.random.split(jax.random.key(3), len(leaves) + 1)
  adapters = jax.tree_util.tree_unflatten(tree, [
      0.5 * jax.random.normal(k, x.shape) / x.shape[0] ** 0.5 for k, x in zip(keys, leaves)])
  head = {'kernel': jax.random.normal(keys[-1], (cfg.d_model,)) / cfg.d_model ** 0.5,
          'bias': jnp.float32(0.5)}
  params = dict(params, scalar_head=head)
  golden = np.load(os.path.join(HERE, 'llama_rm', 'golden.npz'))
  scores = Transformer(lcfg.apply_to(cfg)).apply({'params': lora.combine(params, adapters)},
                                                 jnp.asarray(golden['tokens']), return_scalar=True)
  rewards = np.asarray(scores)[np.arange(2), golden['lengths'] - 1] - 0.5
  hf.save_adapter(adapters, lcfg, cfg, os.path.join(out, 'ours_llama_rm'),
                  base_model_name_or_path='tests/golden/hf/llama_rm', head=head)
  np.savez(os.path.join(out, 'ours_llama_rm.npz'), tokens=golden['tokens'], rewards=rewards)
  with open(os.path.join(out, 'ours_llama_rm.json'), 'w') as f:
    json.dump({'base': 'llama_rm', 'expected': os.path.join(out, 'ours_llama_rm.npz')}, f)
  print(f'exported {sum(f.endswith(".json") for f in os.listdir(out))} adapters to {out}')
  return 0


def check(out: str) -> int:
  import peft  # pylint: disable=g-import-not-at-top
  import safetensors  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  worst, failed = {}, []
  for meta_file in sorted(f for f in os.listdir(out) if f.endswith('.json')):
    case = meta_file[:-len('.json')]
    meta = json.load(open(os.path.join(out, meta_file)))
    expected = np.load(meta['expected'])
    reward = 'rewards' in expected  # a reward model: its head comes from the adapter
    auto = (transformers.AutoModelForSequenceClassification if reward
            else transformers.AutoModelForCausalLM)
    base = auto.from_pretrained(os.path.join(HERE, meta['base']), dtype=torch.float32).eval()
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter('always')
      model = peft.PeftModel.from_pretrained(base, os.path.join(out, case)).eval()
    noted = [str(w.message) for w in caught if 'missing' in str(w.message).lower()
             or 'unexpected' in str(w.message).lower()]
    if noted:
      failed.append(f'{case}: {noted[0][:300]}')
    with safetensors.safe_open(os.path.join(out, case, 'adapter_model.safetensors'), 'np') as f:
      in_file = {k[len('base_model.model.'):-len('.lora_A.weight')] for k in f.keys()
                 if k.endswith('.lora_A.weight')}
    adapted = {n[len('base_model.model.'):] for n, m in model.named_modules()
               if hasattr(m, 'lora_A') and 'default' in m.lora_A}
    if adapted != in_file:
      failed.append(f'{case}: peft adapts {sorted(adapted ^ in_file)[:4]} differently from the '
                    'file')
    with torch.no_grad():
      logits = model(torch.tensor(expected['tokens'], dtype=torch.long)).logits.numpy()
    if reward:
      logits = logits[:, 0]
    worst[case] = float(np.abs(logits - expected['rewards' if reward else 'logits']).max())
  print(json.dumps(worst, indent=2))
  failed += [f'{k}: max |diff| {v:.2e}' for k, v in worst.items() if not v <= TOLERANCE]
  if failed or not worst:
    print('FAILED:', failed or 'no adapters under ' + out)
    return 1
  print(f'peft loads every exported adapter with the expected logits (max |diff| '
        f'{max(worst.values()):.1e}; peft {peft.__version__}, transformers '
        f'{transformers.__version__})')
  return 0


if __name__ == '__main__':
  if len(sys.argv) != 3 or sys.argv[1] not in ('export', 'check'):
    sys.exit(__doc__)
  sys.exit({'export': export, 'check': check}[sys.argv[1]](sys.argv[2]))
