"""Model growth (G_stack and the other atomic growth operators), in one place:

  operators.py  pure functions on param and optimizer-state trees: `grow`, `grow_config`,
                `grow_opt_state`, `depth_sources`, `gstack_plan` (re-exported here)
  in_run.py     growth inside one training run (`config.growth`): which model trains at each
                step, the LR after growth, the growth of the train state, FLOPs
  __main__.py   `python -m pathways_jax.growth --from=RUN --workdir=NEW ...`: grow a finished
                run's checkpoint into a new run directory

See docs/growth.md.
"""
from pathways_jax.growth.operators import (DEPTH_METHODS, WIDTH_METHODS, depth_sources, grow,
                                           grow_config, grow_opt_state, gstack_plan)

__all__ = ('DEPTH_METHODS', 'WIDTH_METHODS', 'depth_sources', 'grow', 'grow_config',
           'grow_opt_state', 'gstack_plan')
