"""A task defined outside the package, in a config file: distillation from a frozen teacher.

The seam test (tests/test_tasks.py) trains it through `python -m pathways_jax.main`: the teacher
is any run directory (`--config.distill.teacher=DIR`), loaded params-only as the step's `aux`;
the loss is next-token cross-entropy plus alpha * KL(teacher || student) on the same targets.
"""
import os

import jax
import jax.numpy as jnp
import ml_collections
import optax

from pathways_jax import tasks
from pathways_jax.config_files import config_from_file
from pathways_jax.objectives import autoregressive
from pathways_jax.train import frozen


@tasks.register('distill')
class DistillTask(tasks.Task):
  perplexity = True

  def setup(self, run):
    teacher = frozen.load(self.cfg.distill.teacher, run.mesh, run.rules)
    self.teacher = teacher.model
    return tasks.FrozenInputs(aux=teacher.params, aux_shardings=teacher.shardings,
                              describe=(f'distill: teacher {teacher.run_dir} step {teacher.step}',))

  def abstract_frozen(self, mesh, rules):
    teacher = frozen.load_abstract(self.cfg.distill.teacher, mesh, rules)
    self.teacher = teacher.model
    return tasks.FrozenInputs(aux=teacher.params, aux_shardings=teacher.shardings)

  def loss(self, params, batch, key, aux=None):
    del key
    tokens, segments = batch['tokens'], batch['segment_ids']
    kw = dict(positions_BL=batch['positions'], segment_ids_BL=segments)
    logits = self.model.apply({'params': params}, tokens, **kw)
    teacher_logits = jax.lax.stop_gradient(self.teacher.apply({'params': aux}, tokens, **kw))
    ce, metrics = autoregressive.loss(logits, tokens, segments)
    valid = jnp.pad(autoregressive.next_token_valid(tokens, segments), ((0, 0), (0, 1)))
    kl_BL = optax.kl_divergence(jax.nn.log_softmax(logits.astype(jnp.float32)),
                                jax.nn.softmax(teacher_logits.astype(jnp.float32)))
    kl = (kl_BL * valid).sum() / jnp.maximum(valid.sum(), 1)
    return ce + self.cfg.distill.alpha * kl, {'ce': ce, 'kl': kl,
                                              tasks.COUNT: metrics['num_tokens']}


def get_config():
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  c = config_from_file(os.path.join(repo, 'experiments', 'quickstart.py'))
  c.name = 'distill'
  c.task = 'distill'
  c.distill = ml_collections.ConfigDict({'teacher': '', 'alpha': 0.5})
  return c
