"""The local tasks' data: JSONL beside their YAMLs, read without `datasets.load_dataset` (so no
download, no Hub lookup, whatever the working directory). The harness passes the task's
`dataset_kwargs` and its metadata (the model_args among them) as keywords."""
import json
import os


def load(file, **unused):
  del unused
  import datasets  # pylint: disable=g-import-not-at-top
  with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), file), encoding='utf-8') as f:
    rows = [json.loads(line) for line in f if line.strip()]
  return {'test': datasets.Dataset.from_list(rows)}
