"""Time applying every rank decision of ResNet-18 (fraction 0.25) with the full SVD and with the
Gram-matrix eigendecomposition that compress.lowrank uses, interleaved, 3 runs each (BENCHMARKS.md)."""
import statistics, time, torch
import autocompress.compress.lowrank as lr
from autocompress.api import open_model
from autocompress.compress import apply
from autocompress.space.policy import Policy

def svd_factor(weight, r):
    mat = weight.detach().double().flatten(1)
    u, s, vh = torch.linalg.svd(mat, full_matrices=False)
    root = s[:r].sqrt()
    return (root[:, None] * vh[:r]).to(weight.dtype), (u[:, :r] * root[None, :]).to(weight.dtype)

ws = open_model("torchvision:resnet18")
ranks = ws.space.of_kind("rank")
policy = Policy(ws.space.model, ws.space.fingerprint, {d.id: 0.25 for d in ranks if 0.25 in d.choices})
gram = lr._factor
out = {}
for name, fn in (("svd", svd_factor), ("gram", gram), ("svd", svd_factor), ("gram", gram), ("svd", svd_factor), ("gram", gram)):
    lr._factor = fn
    t = time.perf_counter(); apply(ws.model, policy, ws.space); out.setdefault(name, []).append(time.perf_counter() - t)
print(len(policy.decisions), "rank decisions", torch.get_num_threads(), "threads")
for k, v in out.items():
    print(k, "%.2f ± %.2f s" % (statistics.mean(v), statistics.stdev(v)), [round(x, 2) for x in v])
