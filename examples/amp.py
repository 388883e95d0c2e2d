import torch

import projunn

model = torch.nn.Sequential(projunn.nn.UnitaryLinear(64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
base = torch.optim.SGD(projunn.optim.param_groups(model, unitary_lr=1e-2), lr=1e-2, momentum=0.9)
opt = projunn.optim.ProjUNN(base, seed=0)  # attached to base: the scaler steps base
scaler = torch.amp.GradScaler("cpu")  # "cuda" on a GPU

for _ in range(20):
    x, y = torch.randn(32, 64), torch.randint(0, 10, (32,))
    with torch.autocast("cpu", dtype=torch.float16):  # weights stay float32
        loss = torch.nn.functional.cross_entropy(model(x), y)
    scaler.scale(loss).backward()
    scaler.unscale_(base)  # optional: clip true gradients
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    scaler.step(base)  # skipped on overflow: then no projection either
    scaler.update()
    base.zero_grad()
print(opt.steps, projunn.functional.unitarity_error(model[0].weight.detach()))
