"""bpcp_jax beside PyTorch on the same machine, in one run, rounds interleaved.

The PyTorch side is a plain eager implementation of the same ResNet-v2-56 (pre-activation
bottleneck, written here from the architecture description) trained the way the original BPCP
code trains it: a dense step (SGD, momentum 0.9, weight decay 1e-4), and a search step that
samples the block gates on the host, runs the gated forward, and sets the logits' gradient to
dL/dg * p(1 - p) with a second optimizer. The JAX side is the steps the training loop runs
(``parallel.parallel_train_step``). Both get uint8 batches: PyTorch normalises on the host (its
augmentation cost is left out, to its advantage), JAX augments inside the step. Also timed:
inference at batch 1 and 128. Each side runs in a worker process of its own (same interpreter,
same host allocator), and the rounds of the sides alternate with a short idle between them: in
one process, PyTorch's OpenMP threads spinning after each parallel region slowed the JAX steps
by a third. Needs ``torch`` (not a dependency of the package):

    pip install torch
    python -m benchmarks.vs_pytorch --json benchmarks/results/vs_pytorch.json
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

from benchmarks import common

if __name__ == "__main__":  # one allocator for both sides, before jax starts
  common.restart_with_allocator("benchmarks.vs_pytorch", sys.argv[1:])


def torch_resnet_v2(depth: int, num_classes: int = 10):
  import torch
  from torch import nn

  n = (depth - 2) // 9

  class Block(nn.Module):
    def __init__(self, cin, planes, stride, project):
      super().__init__()
      self.bn1, self.bn2, self.bn3 = nn.BatchNorm2d(cin), nn.BatchNorm2d(planes), nn.BatchNorm2d(planes)
      self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
      self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
      self.conv3 = nn.Conv2d(planes, 4 * planes, 1, bias=False)
      self.shortcut = nn.Conv2d(cin, 4 * planes, 1, stride, bias=False) if project else None

    def forward(self, x, gate=None):
      res = x if self.shortcut is None else self.shortcut(x)
      h = self.conv1(torch.relu(self.bn1(x)))
      h = self.conv2(torch.relu(self.bn2(h)))
      h = self.conv3(torch.relu(self.bn3(h)))
      return res + (h if gate is None else h * gate)

  class Net(nn.Module):
    def __init__(self):
      super().__init__()
      self.stem = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
      blocks, cin = [], 16
      for planes, stride in ((16, 1), (32, 2), (64, 2)):
        for i in range(n):
          blocks.append(Block(cin, planes, stride if i == 0 else 1, i == 0))
          cin = 4 * planes
      self.blocks = nn.ModuleList(blocks)
      self.bn, self.fc = nn.BatchNorm2d(cin), nn.Linear(cin, num_classes)
      self.alpha = nn.Parameter(torch.zeros(len(blocks)))
      self.gate = nn.Parameter(torch.ones(len(blocks)))

    def forward(self, x, gated=False):
      x = self.stem(x)
      for i, b in enumerate(self.blocks):
        x = b(x, self.gate[i] if gated else None)
      return self.fc(torch.flatten(torch.relu(self.bn(x)).mean((2, 3)), 1))

  return Net()


def torch_runners(batch: int, channels_last: bool):
  import numpy as np
  import torch
  import torch.nn.functional as F

  torch.manual_seed(0)
  net = torch_resnet_v2(56)
  fmt = torch.channels_last if channels_last else torch.contiguous_format
  net = net.to(memory_format=fmt)
  weights = [p for n, p in net.named_parameters() if n not in ("alpha", "gate")]
  opt = torch.optim.SGD(weights, lr=0.1, momentum=0.9, weight_decay=1e-4)
  arch = torch.optim.SGD([net.alpha], lr=0.1, momentum=0.9)
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (batch, 32, 32, 3), dtype=np.uint8)
  labels = torch.as_tensor(rng.integers(0, 10, batch))
  mean = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)
  std = torch.tensor([0.2023, 0.1994, 0.2010]).view(1, 3, 1, 1)

  def to_input(x):
    t = torch.as_tensor(x).permute(0, 3, 1, 2).float().div(255)
    return ((t - mean) / std).contiguous(memory_format=fmt)

  def dense():
    net.train()
    opt.zero_grad()
    F.cross_entropy(net(to_input(images)), labels).backward()
    opt.step()

  def search():
    net.train()
    opt.zero_grad()
    arch.zero_grad()
    with torch.no_grad():  # host-side sampling, as the original code does
      net.gate.copy_(torch.bernoulli(torch.sigmoid(net.alpha)))
    loss = F.cross_entropy(net(to_input(images), gated=True), labels) + 0.05 * net.gate.abs().sum()
    loss.backward()
    p = torch.sigmoid(net.alpha)
    net.alpha.grad = net.gate.grad * p * (1 - p)
    opt.step()
    arch.step()

  x1, x128 = to_input(images[:1]), to_input(images)

  def infer(x):
    net.eval()
    with torch.no_grad():
      net(x)

  return {"dense": dense, "search": search, "infer_b1": lambda: infer(x1), "infer_b128": lambda: infer(x128)}


def jax_runners(batch: int):
  import jax
  import numpy as np

  import bpcp_jax as bp
  from benchmarks.train_throughput import make_runner

  runs = {m: make_runner(m, "pmap", "resnet_v2_56", batch)[0] for m in ("dense", "search")}
  model = bp.create_model("resnet_v2_56")
  variables = jax.device_put(common.fast_init(model, 0))  # on the device, as after training
  apply = jax.jit(lambda v, x: model.apply(v, x, train=False))
  predict = bp.make_predictor(model, variables)  # deployed: weights compiled in
  x1 = jax.device_put(np.zeros((1, 32, 32, 3), np.float32))
  x128 = jax.device_put(np.zeros((batch, 32, 32, 3), np.float32))
  runs["infer_b1"] = lambda: predict(x1)
  runs["infer_b128"] = lambda: predict(x128)
  runs["infer_b1_args"] = lambda: apply(variables, x1)
  return runs


SIDES = ("pytorch_eager", "pytorch_channels_last", "bpcp_jax")


def worker_main(side: str, batch: int, threads: int) -> None:
  """Serve one side: build and warm its runners, then time ``name count`` requests from stdin."""
  if side.startswith("pytorch"):
    import torch

    torch.set_num_threads(threads)
    runs = torch_runners(batch, side == "pytorch_channels_last")
  else:
    runs = jax_runners(batch)
  for fn in runs.values():  # warm-up and compile
    common.timed(fn)
  print("ready", flush=True)
  for line in sys.stdin:
    name, count = line.split()
    print(sum(common.timed(runs[name]) for _ in range(int(count))) / int(count), flush=True)


class Worker:
  """A side in its own process (same interpreter, same allocator): no thread pool of one side
  (PyTorch's OpenMP threads spin after each parallel region) can slow the other."""

  def __init__(self, side: str, batch: int, threads: int):
    cmd = [sys.executable, "-m", "benchmarks.vs_pytorch", "--_worker", side, "--batch", str(batch),
           "--threads", str(threads)]
    self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                 cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if self.proc.stdout.readline().strip() != "ready":
      raise SystemExit(f"benchmarks.vs_pytorch: the {side} worker failed to start (see its error above)")

  def time(self, name: str, count: int) -> float:
    self.proc.stdin.write(f"{name} {count}\n")
    self.proc.stdin.flush()
    return float(self.proc.stdout.readline())

  def close(self):
    self.proc.stdin.close()
    self.proc.wait()


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  common.add_common_args(p)
  p.add_argument("--batch", type=int, default=128)
  p.add_argument("--threads", type=int, default=2, help="PyTorch intra-op threads (the machine's cores)")
  p.add_argument("--settle", type=float, default=1.0,
                 help="seconds of idle between two sides' rounds (idle thread pools stop spinning)")
  p.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  batch = 8 if args.quick else args.batch
  if args._worker:
    worker_main(args._worker, args.batch, args.threads)
    return {}
  try:
    import torch
  except ImportError:
    raise SystemExit("benchmarks.vs_pytorch needs torch: pip install torch")
  sides = {s: Worker(s, batch, args.threads) for s in SIDES}
  reps = {"dense": 3, "search": 3, "infer_b1": 50, "infer_b128": 3}
  extra = {"bpcp_jax": {"infer_b1_args": 50}}  # JAX only: weights passed as arguments
  if args.quick:
    reps = {k: 1 for k in reps}
  times = {(s, k): [] for s in sides for k in reps}
  try:
    for _ in range(1 if args.quick else args.repeats):  # interleaved rounds
      for s, worker in sides.items():
        time.sleep(args.settle)
        for k, n in {**reps, **extra.get(s, {})}.items():
          times.setdefault((s, k), []).append(worker.time(k, n))
  finally:
    for worker in sides.values():
      worker.close()
  med = {key: common.median(v) for key, v in times.items()}
  results = {"batch": batch, "torch_version": torch.__version__, "torch_threads": args.threads,
             "settle_s": args.settle, "processes": "one worker per side"}
  rows = []
  for s in sides:
    results[f"{s}_dense_step_images_per_s"] = batch / med[(s, "dense")]
    results[f"{s}_search_step_images_per_s"] = batch / med[(s, "search")]
    results[f"{s}_inference_b1_ms"] = 1e3 * med[(s, "infer_b1")]
    results[f"{s}_inference_b128_images_per_s"] = batch / med[(s, "infer_b128")]
    rows.append([s, f"{batch / med[(s, 'dense')]:.1f}", f"{batch / med[(s, 'search')]:.1f}",
                 f"{med[(s, 'dense')] / med[(s, 'search')]:.2f}", f"{1e3 * med[(s, 'infer_b1')]:.2f}",
                 f"{batch / med[(s, 'infer_b128')]:.0f}"])
  for k in ("dense_step_images_per_s", "search_step_images_per_s", "inference_b128_images_per_s"):
    results[f"jax_over_pytorch_eager_{k}"] = results[f"bpcp_jax_{k}"] / results[f"pytorch_eager_{k}"]
  results["bpcp_jax_inference_b1_weights_as_arguments_ms"] = 1e3 * med[("bpcp_jax", "infer_b1_args")]
  results["pytorch_eager_over_jax_inference_b1_ms"] = results["pytorch_eager_inference_b1_ms"] / \
      results["bpcp_jax_inference_b1_ms"]
  table = common.markdown_table(
      ["side", "dense step img/s", "search step img/s", "search / dense", "inference b1 ms", "inference b128 img/s"],
      rows)
  table += ("\n\nbpcp_jax inference runs as deployed, weights compiled in (`bp.make_predictor`); with the "
            "weights passed as arguments to `jax.jit(model.apply)`, batch 1 takes "
            f"{results['bpcp_jax_inference_b1_weights_as_arguments_ms']:.2f} ms.")
  common.write_outputs("vs_pytorch", args, results, table)
  return results


if __name__ == "__main__":
  main(sys.argv[1:])
