"""Tasks: what the trainer trains (see base.py). Built in: 'autoregressive', 'diffusion' (LLaDA
pretraining), 'llada_sft' (LLaDA's SFT loss), 'rho1' (selective language modelling over
'autoregressive' or 'diffusion'), 'dpo' (preference optimisation), 'grpo' (RL with rollouts)."""
from pathways_jax.tasks.base import (ADAPTER_IDS, COUNT, OWN_COUNT, FrozenInputs, RunContext, Task,
                                     per_adapter_losses)
from pathways_jax.tasks.registry import get, make, names, register, task_name
from pathways_jax.tasks import pretrain  # pylint: disable=unused-import  (registers its tasks)
from pathways_jax.tasks import dpo  # pylint: disable=unused-import
from pathways_jax.tasks import grpo  # pylint: disable=unused-import
from pathways_jax.tasks import rho1  # pylint: disable=unused-import
from pathways_jax.tasks import reward_model  # pylint: disable=unused-import
from pathways_jax.tasks import sft  # pylint: disable=unused-import
from pathways_jax.tasks import vrpo  # pylint: disable=unused-import
