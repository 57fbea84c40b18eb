"""HuggingFace tokenizers (`tokenizer.json`, with `tokenizer_config.json` beside it) and their
chat templates, with the special ids the tokenizer itself defines.

    tok = HFTokenizer.from_path('path/to/model_dir')       # or the tokenizer.json itself
    tok.encode('hello'), tok.bos_id, tok.eos_id, tok.specials['<|im_end|>']
    tok.render_chat([{'role': 'user', 'content': 'hi'}], add_generation_prompt=True)

Special ids come from the files, never from constants: `bos_token`, `eos_token`, `pad_token`,
`mask_token` and `unk_token` of tokenizer_config.json (strings or {"content": ...}), looked up in
the vocabulary; `specials` maps every added special token's text to its id (chat roles,
end-of-turn markers). Without a pad token, padding uses the eos id (what HF trainers do); a mask
token may also be given by `mask_token_id` in a config.json beside the tokenizer (LLaDA's
126336). A token a task needs and the tokenizer lacks is an error naming it (`require`).

Chat templates are rendered as transformers renders them: a sandboxed jinja2 environment with
`trim_blocks` and `lstrip_blocks`, `raise_exception`, a `tojson` filter, and the template's
variables `messages`, `add_generation_prompt`, `bos_token`, `eos_token` (and the other special
tokens by name).
"""
from __future__ import annotations

import hashlib
import json
import os
import pathlib
from typing import Iterable, Sequence

import numpy as np

from pathways_jax.config import ConfigError

_SPECIAL_NAMES = ('bos', 'eos', 'pad', 'mask', 'unk')
_END_OF_TURN = ('<|eot_id|>', '<|im_end|>', '<|end|>', '<end_of_turn>', '<|eot|>')


def _token_text(value) -> str | None:
  if isinstance(value, dict):
    return value.get('content')
  return value if isinstance(value, str) else None


class HFTokenizer:
  """A `tokenizers.Tokenizer` with the pipeline's interface (`encode`, `encode_batch`, `decode`,
  special ids) and HF chat templates."""

  def __init__(self, tokenizer_json: str, config: dict | None = None, *, name: str = 'hf',
               extra_config: dict | None = None):
    import tokenizers  # pylint: disable=g-import-not-at-top
    try:
      self._tok = tokenizers.Tokenizer.from_str(tokenizer_json)
    except Exception as e:  # tokenizers raises a bare Exception subclass
      raise ValueError(f'{name}: not a valid tokenizer.json ({e})') from None
    self.name = name
    self.config = dict(config or {})
    self.fingerprint = 'hf-' + hashlib.blake2b(
        tokenizer_json.encode() + json.dumps(self.config, sort_keys=True, default=str).encode(),
        digest_size=8).hexdigest()
    self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))
    added = self._tok.get_added_tokens_decoder()
    self.specials = {t.content: int(i) for i, t in sorted(added.items()) if t.special}
    ids = {}
    for key in _SPECIAL_NAMES:
      text = _token_text(self.config.get(f'{key}_token'))
      token_id = None if text is None else self._tok.token_to_id(text)
      if text is not None and token_id is None:
        raise ValueError(f'{name}: {key}_token {text!r} of tokenizer_config.json is not in the '
                         'vocabulary')
      ids[key] = token_id
    if ids['mask'] is None and (extra_config or {}).get('mask_token_id') is not None:
      ids['mask'] = int(extra_config['mask_token_id'])
    if ids['pad'] is None:
      ids['pad'] = ids['eos']
    self.bos_id, self.eos_id, self.pad_id, self.mask_id, self.unk_id = (
        ids[k] for k in ('bos', 'eos', 'pad', 'mask', 'unk'))
    eot = [self.specials[t] for t in _END_OF_TURN if t in self.specials]
    self.end_of_turn_id = eot[0] if eot else self.eos_id
    self.special_ids = frozenset(i for i in (*self.specials.values(), *ids.values())
                                 if i is not None)
    template = self.config.get('chat_template')
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
      template = next((t['template'] for t in template if t.get('name') == 'default'), None)
    self.chat_template = template

  @classmethod
  def from_path(cls, path: str | os.PathLike) -> 'HFTokenizer':
    """A model directory (tokenizer.json, tokenizer_config.json, config.json) or a tokenizer.json."""
    path = pathlib.Path(path).expanduser()
    directory, file = (path, path / 'tokenizer.json') if path.is_dir() else (path.parent, path)
    if not file.is_file():
      raise FileNotFoundError(f'no tokenizer.json at {file}')
    config, extra = {}, {}
    for name, target in (('tokenizer_config.json', config), ('config.json', extra)):
      if (directory / name).is_file():
        try:
          target.update(json.loads((directory / name).read_text(encoding='utf-8')))
        except json.JSONDecodeError as e:
          raise ValueError(f'{directory / name} is not valid JSON: {e}') from None
    return cls(file.read_text(encoding='utf-8'), config, name=f'hf:{file}', extra_config=extra)

  def save(self, directory: str | os.PathLike) -> None:
    """tokenizer.json and tokenizer_config.json into `directory` (what `from_path` reads)."""
    directory = pathlib.Path(directory)
    (directory / 'tokenizer.json').write_text(self._tok.to_str(), encoding='utf-8')
    (directory / 'tokenizer_config.json').write_text(json.dumps(self.config, indent=2),
                                                     encoding='utf-8')

  # -- text <-> ids -------------------------------------------------------------------------
  def encode(self, text: str) -> list[int]:
    return self._tok.encode(text, add_special_tokens=False).ids

  def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
    return [np.asarray(e.ids, np.int32)
            for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

  def decode(self, ids: Iterable[int]) -> str:
    ids = [int(i) for i in ids]
    return self._tok.decode([i for i in ids if i not in self.special_ids
                             and 0 <= i < self.vocab_size], skip_special_tokens=True)

  def require(self, names: Sequence[str], who: str) -> None:
    """Raises naming the special tokens in `names` ('bos', 'eos', 'pad', 'mask') it lacks."""
    missing = [n for n in names if getattr(self, f'{n}_id') is None]
    if missing:
      raise ConfigError(f'{who} needs the special token(s) {missing}, which the tokenizer '
                        f'{self.name} does not define (set them in its tokenizer_config.json, '
                        f'or config.data.{missing[0]}_id)')

  # -- chat ---------------------------------------------------------------------------------
  def render_chat(self, messages: Sequence[dict], *, add_generation_prompt: bool = False) -> str:
    """The conversation as text, by the tokenizer's chat template (as transformers renders it)."""
    if not self.chat_template:
      raise ConfigError(f'the tokenizer {self.name} has no chat_template in its '
                        'tokenizer_config.json')
    tokens = {f'{k}_token': _token_text(self.config.get(f'{k}_token')) for k in _SPECIAL_NAMES}
    return self._compiled_template().render(
        messages=list(messages), add_generation_prompt=add_generation_prompt, **tokens)

  def _compiled_template(self):
    # Compiled once per tokenizer: chat.render renders every prefix of every conversation, and
    # compiling the template each time made encoding a chat corpus ~20x slower than rendering.
    if getattr(self, '_template', None) is None:
      from jinja2 import exceptions, ext, sandbox  # pylint: disable=g-import-not-at-top

      def raise_exception(message):
        raise exceptions.TemplateError(message)

      env = sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                  extensions=[ext.loopcontrols])
      env.filters['tojson'] = lambda x, indent=None: json.dumps(x, ensure_ascii=False,
                                                                indent=indent)
      env.globals['raise_exception'] = raise_exception
      self._template = env.from_string(self.chat_template)
    return self._template
