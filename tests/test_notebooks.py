"""Every notebook runs top to bottom (tiny settings via PATHWAYS_NOTEBOOK_TINY=1)."""
import glob
import os

import nbformat
import pytest
from nbclient import NotebookClient

from helpers import REPO

NOTEBOOKS = sorted(glob.glob(os.path.join(REPO, 'notebooks', '*.ipynb')))


@pytest.mark.parametrize('path', NOTEBOOKS, ids=os.path.basename)
def test_notebook_runs_top_to_bottom(path, monkeypatch):
  monkeypatch.setenv('PATHWAYS_NOTEBOOK_TINY', '1')
  monkeypatch.setenv('MPLBACKEND', 'Agg')
  monkeypatch.setenv('JAX_PLATFORMS', 'cpu')
  nb = nbformat.read(path, as_version=4)
  NotebookClient(nb, timeout=900, kernel_name='python3',
                 resources={'metadata': {'path': REPO}}).execute()
