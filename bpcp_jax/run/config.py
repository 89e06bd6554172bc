"""Run configuration: the defaults every experiment config starts from, and command-line overrides.

Experiment files (``experiments/configs/*.py``) define ``get_config()`` returning an
``ml_collections.ConfigDict`` built from ``default_config()``. Any field can be overridden on
the command line as ``--config.stages.search.gamma=0.1``; a key that does not exist or a value
of the wrong type is an error that names it.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import json
import os
from typing import Any, Sequence

import ml_collections

STAGES = ("pretrain", "search", "finetune_blocks", "prune", "finetune_channels")
DEFAULT_CONFIG_TEXT = ("the paper's recipe: resnet_v2_56 on all 50,000 CIFAR-10 training images, 160 epochs per "
                       "training stage (a GPU job; experiments/configs/smoke.py runs in minutes on a CPU)")
# settings a resumed run may change: they decide what is logged and kept, never what is computed
RESUME_FREE_KEYS = ("data.cache_dir", "log_every_steps", "checkpoint.keep", "checkpoint.every_steps")


class ConfigError(ValueError):
  """A config file or override that cannot be used; the message names it."""


def default_config() -> ml_collections.ConfigDict:
  """The paper's recipe (ResNet-v2-56, 160 epochs per training stage, CIFAR-10): ``DEFAULT_CONFIG_TEXT``."""
  c = ml_collections.ConfigDict()
  # a family network ("resnet_v2_56") or your own Flax classifier: "path/to/file.py:make_model" or
  # "package.module:make_model" (called with num_classes if it takes it, and with rngs=nnx.Rngs(...) when it
  # makes a flax.nnx module; traced to find its groups)
  c.model = "resnet_v2_56"
  # where the logits are in what your network returns: "auto" takes an array as it is and an output object's
  # .logits (a dict's "logits"); else a field, key or tuple index, dotted for a path: "logits", "0", "out.logits"
  c.model_output = "auto"
  c.num_classes = 10
  # start from trained weights instead of a fresh init: an orbax checkpoint directory or a flax
  # msgpack file (flax.serialization.to_bytes of the variables); then pretraining can be skipped
  c.init_from = ""
  c.init_style = "original"
  c.dtype = "float32"
  c.seed = 0

  c.data = ml_collections.ConfigDict()
  c.data.source = "folder"  # "folder" (offline image folder / archive) or "tfds:cifar10" / "tfds:cifar100"
  c.data.path = ""  # folder source: "" = $BPCP_DATA or ../shared/data/cifar10-jpeg.tar.gz
  c.data.tfds_data_dir = ""
  c.data.cache_dir = ""
  c.data.max_train_per_class = 0  # 0 = all; a smaller train set for quick runs
  c.data.max_test_per_class = 0  # 0 = all 1,000 per class

  c.batch_size = 128  # global batch, split over all devices of all hosts
  c.eval_batch_size = 500
  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 0.1
  c.optim.momentum = 0.9
  c.optim.weight_decay = 1e-4
  c.optim.schedule = "step"  # x0.1 at 50% and 75% of a stage's epochs; or "cosine", "constant"
  c.optim.gate_lr = 0.1

  c.stages = ml_collections.ConfigDict()
  c.stages.run = ",".join(STAGES)  # which stages the pipeline runs, in this order
  c.stages.pretrain = ml_collections.ConfigDict({"epochs": 160, "lr": 0.1, "bn_l1": 0.0})
  # method "bp": the learned search (seed: its own seed for the gate samples, 0 = the run's key alone);
  # "random" / "last" / "single_drop" / "importance": remove `blocks` blocks by that rule instead (the
  # controls, pruning/block_controls.py; random draws with select_seed; the last two score the blocks on
  # control_images training images), no training
  c.stages.search = ml_collections.ConfigDict({"epochs": 160, "lr": 0.1, "gamma": 0.05, "method": "bp",
                                               "blocks": 0, "select_seed": 0, "seed": 0,
                                               "control_images": 512})
  # distill > 0: the dense network teaches at that temperature, with weight distill_weight on its soft targets
  c.stages.finetune_blocks = ml_collections.ConfigDict({"epochs": 160, "lr": 0.1, "distill": 0.0,
                                                        "distill_weight": 0.5})
  c.stages.prune = ml_collections.ConfigDict({
      "criterion": "bn_scale", "ratio": 0.4, "target": "channels", "reduce": "max", "scope": "global",
      "round_to": 1, "min_channels": 1,
      # "criterion": rank channels by the criterion alone; "speed": choose blocks and channels by
      # importance per unit of cost (speed_select.py), cost "macs" or measured "latency" at
      # latency_batch; latency_ms > 0 replaces the ratio by a measured latency budget
      "selection": "criterion", "cost": "latency", "latency_batch": 1, "latency_ms": 0.0, "blocks": True})
  c.stages.finetune_channels = ml_collections.ConfigDict({"epochs": 160, "lr": 0.1, "distill": 0.0,
                                                          "distill_weight": 0.5})

  c.checkpoint = ml_collections.ConfigDict({"keep": 3, "every_steps": 0})
  c.log_every_steps = 20
  c.eval_every_epochs = 1  # 0 = evaluate at the end of each stage only
  c.profile = ml_collections.ConfigDict({"batch_sizes": "1,128", "repeats": 20})
  return c


def call_python_file(path: str, function: str, error=None):
  """Import a Python file by path and call its ``function()`` (config and sweep files)."""
  error = error or ConfigError
  kind = "config" if function == "get_config" else "sweep"
  if not os.path.isfile(path):
    raise error(f"{kind} file not found: {path}")
  spec = importlib.util.spec_from_file_location(f"bpcp_{kind}_{abs(hash(path))}", path)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
  except Exception as e:  # a broken file: say which one
    raise error(f"could not load {kind} file {path}: {type(e).__name__}: {e}") from e
  if not hasattr(module, function):
    raise error(f"{kind} file {path} defines no {function}()")
  return getattr(module, function)()


def load_config_file(path: str) -> ml_collections.ConfigDict:
  """Import ``get_config()`` from a Python config file."""
  config = call_python_file(path, "get_config")
  check_config(config, where=path)
  return config


def check_config(config: ml_collections.ConfigDict, where: str = "config") -> None:
  """Every key must be one ``default_config()`` knows (catches typos in config files)."""
  known = _flatten(default_config())
  for key in _flatten(config):
    if key not in known:
      raise ConfigError(f"{unknown_key_message(key, known)} (in {where})")


def _flatten(c, prefix=""):
  out = {}
  for k, v in c.items():
    name = f"{prefix}{k}"
    if isinstance(v, ml_collections.ConfigDict):
      out.update(_flatten(v, name + "."))
    else:
      out[name] = v
  return out


def unknown_key_message(key: str, known) -> str:
  """``unknown config key ...``: the deepest section of ``key`` that exists, its valid keys, and
  the closest match (``stages.serch.gamma``: no 'serch' in 'stages'; valid: pretrain, search, ...)."""
  parts = key.split(".")
  sections = {".".join(k.split(".")[:i]) for k in known for i in range(1, k.count(".") + 1)}
  depth = 0
  while depth < len(parts) - 1 and ".".join(parts[:depth + 1]) in sections:
    depth += 1
  head = ".".join(parts[:depth])
  prefix = head + "." if head else ""
  if depth < len(parts) - 1 and prefix + parts[depth] in known:
    return f"unknown config key {key!r}: {prefix + parts[depth]!r} is a value, not a section"
  names = sorted({k[len(prefix):].split(".")[0] for k in known if k.startswith(prefix)})
  close = difflib.get_close_matches(parts[depth], names, n=1)
  hint = f"; did you mean {prefix + close[0]!r}?" if close else ""
  return (f"unknown config key {key!r}: no {parts[depth]!r} in {('section ' + repr(head)) if head else 'the config'}"
          f"; valid keys there: {', '.join(names)}{hint}")


def apply_overrides(config: ml_collections.ConfigDict, overrides: Sequence[str]) -> ml_collections.ConfigDict:
  """Apply ``key=value`` overrides (``--config.`` prefix optional); values keep the field's type."""
  config = ml_collections.ConfigDict(config.to_dict())
  known = _flatten(config)
  for item in overrides:
    text = item[len("--config."):] if item.startswith("--config.") else item
    if "=" not in text:
      raise ConfigError(f"override {item!r} is not key=value")
    key, raw = text.split("=", 1)
    if key not in known:
      raise ConfigError(f"{unknown_key_message(key, known)} (from {item!r})")
    old = known[key]
    try:
      if isinstance(old, bool):
        if raw.lower() not in ("true", "false", "1", "0"):
          raise ValueError(raw)
        value = raw.lower() in ("true", "1")
      elif isinstance(old, int):
        value = int(raw)
      elif isinstance(old, float):
        value = float(raw)
      elif isinstance(old, str):
        value = raw
      else:
        value = ast.literal_eval(raw)
    except ValueError as e:
      raise ConfigError(f"config key {key!r} expects {type(old).__name__}, got {raw!r}") from e
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def stage_list(config) -> list[str]:
  stages = [s.strip() for s in config.stages.run.split(",") if s.strip()]
  bad = [s for s in stages if s not in STAGES]
  if bad:
    raise ConfigError(f"unknown stage(s) {bad} in stages.run; choose from {', '.join(STAGES)}")
  return stages


def load_config_json(path: str) -> ml_collections.ConfigDict:
  """The config a run wrote to its ``config.json``; keys added to the defaults since then take
  their default values."""
  try:
    with open(path) as f:
      saved = json.load(f)
  except (OSError, ValueError) as e:
    raise ConfigError(f"cannot read the run's settings {path}: {e}") from e
  config = default_config()
  known = _flatten(config)
  for key, value in _flatten(ml_collections.ConfigDict(saved)).items():
    if key not in known:
      raise ConfigError(f"{unknown_key_message(key, known)} (in {path})")
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def config_differences(saved: dict[str, Any], config: ml_collections.ConfigDict,
                       ignore: Sequence[str] = RESUME_FREE_KEYS) -> list[tuple[str, Any, Any]]:
  """``(key, saved value, value now)`` for every setting that differs from a run's ``config.json``
  (``saved``, a dict); a key the saved run did not have counts as its default value."""
  now = _flatten(config)
  before = {**_flatten(default_config()), **_flatten(ml_collections.ConfigDict(saved))}
  return [(k, before.get(k), v) for k, v in sorted(now.items()) if k not in ignore and before.get(k) != v]
