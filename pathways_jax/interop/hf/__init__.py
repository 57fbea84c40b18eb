"""HuggingFace checkpoints in and out: Llama 2/3.x, Qwen2/2.5, Qwen3 and LLaDA-8B.

    from pathways_jax.interop import hf
    params, model_cfg, tokenizer = hf.load_pretrained('path/to/Llama-3.2-1B')
    hf.save_pretrained(params, model_cfg, 'out_dir', tokenizer=tokenizer)
    # a reward model (model.scalar_head) goes in and out as ...ForSequenceClassification
    lora_params, lcfg = hf.load_adapter('path/to/peft_adapter', model_cfg)   # PEFT LoRA
    hf.save_adapter(lora_params, lcfg, model_cfg, 'out_adapter')

`checkpoint.py`: tensors and layouts; `config.py`: config.json <-> ModelConfig; `adapter.py`:
PEFT LoRA adapter directories; `run_dir.py`: imports as run directories and `train.init_from`;
`python -m pathways_jax.interop.hf import|export|export-adapter` (`__main__.py`).
"""
from pathways_jax.interop.hf.checkpoint import (SCORE_BIAS_KEY, HFCheckpointError, load_pretrained,
                                                read_config, save_pretrained, tensor_map)
from pathways_jax.interop.hf.config import SUPPORTED, UnsupportedModel
from pathways_jax.interop.hf.adapter import (AdapterError, load_adapter, load_adapter_head,
                                             save_adapter)
