"""bpcp_jax beside PyTorch on the same machine, in one process, rounds interleaved.

The PyTorch side is a plain eager implementation of the same ResNet-v2-56 (pre-activation
bottleneck, written here from the architecture description) trained the way the original BPCP
code trains it: a dense step (SGD, momentum 0.9, weight decay 1e-4), and a search step that
samples the block gates on the host, runs the gated forward, and sets the logits' gradient to
dL/dg * p(1 - p) with a second optimizer. The JAX side is the steps the training loop runs
(``parallel.parallel_train_step``). Both get uint8 batches: PyTorch normalises on the host (its
augmentation cost is left out, to its advantage), JAX augments inside the step. Also timed:
inference at batch 1 and 128. Needs ``torch`` (not a dependency of the package):

    pip install torch
    python -m benchmarks.vs_pytorch --json benchmarks/results/vs_pytorch.json
"""

from __future__ import annotations

import argparse
import sys
import time

from benchmarks import common

if "--no-huge-pages" not in sys.argv:  # both sides run with the command line's malloc setting
  from bpcp_jax.host import reexec_with_huge_pages

  reexec_with_huge_pages(["-m", "benchmarks.vs_pytorch", *sys.argv[1:]])

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
  variables = common.fast_init(model, 0)
  apply = jax.jit(lambda v, x: model.apply(v, x, train=False))
  x1 = jax.device_put(np.zeros((1, 32, 32, 3), np.float32))
  x128 = jax.device_put(np.zeros((batch, 32, 32, 3), np.float32))
  runs["infer_b1"] = lambda: apply(variables, x1)
  runs["infer_b128"] = lambda: apply(variables, x128)
  return runs


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  common.add_common_args(p)
  p.add_argument("--batch", type=int, default=128)
  p.add_argument("--threads", type=int, default=2, help="PyTorch intra-op threads (the machine's cores)")
  p.add_argument("--no-huge-pages", action="store_true", help="do not restart with huge-page malloc")
  args = p.parse_args(argv)
  try:
    import torch
  except ImportError:
    raise SystemExit("benchmarks.vs_pytorch needs torch: pip install torch")
  torch.set_num_threads(args.threads)
  batch = 8 if args.quick else args.batch
  sides = {"pytorch_eager": torch_runners(batch, False), "pytorch_channels_last": torch_runners(batch, True),
           "bpcp_jax": jax_runners(batch)}
  reps = {"dense": 3, "search": 3, "infer_b1": 50, "infer_b128": 3}
  if args.quick:
    reps = {k: 1 for k in reps}
  for side in sides.values():  # warm-up and compile
    for fn in side.values():
      common.timed(fn)
  times = {(s, k): [] for s in sides for k in reps}
  for _ in range(1 if args.quick else args.repeats):  # interleaved rounds
    for s, side in sides.items():
      for k, n in reps.items():
        times[(s, k)].append(sum(common.timed(side[k]) for _ in range(n)) / n)
  med = {key: common.median(v) for key, v in times.items()}
  results = {"batch": batch, "torch_version": torch.__version__, "torch_threads": args.threads}
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
  results["pytorch_eager_over_jax_inference_b1_ms"] = results["pytorch_eager_inference_b1_ms"] / \
      results["bpcp_jax_inference_b1_ms"]
  table = common.markdown_table(
      ["side", "dense step img/s", "search step img/s", "search / dense", "inference b1 ms", "inference b128 img/s"],
      rows)
  common.write_outputs("vs_pytorch", args, results, table)
  return results


if __name__ == "__main__":
  t0 = time.time()
  main(sys.argv[1:])
