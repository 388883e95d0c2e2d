import torch

import projunn

model = torch.nn.Sequential(projunn.nn.UnitaryLinear(64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
base = torch.optim.SGD(projunn.optim.param_groups(model, unitary_lr=1e-2), lr=1e-2, momentum=0.9)
opt = projunn.optim.ProjUNN(base, seed=0)  # an optimizer: hand it to the scaler
scaler = torch.amp.GradScaler("cpu")  # "cuda" on a GPU

for _ in range(20):
    x, y = torch.randn(32, 64), torch.randint(0, 10, (32,))
    with torch.autocast("cpu", dtype=torch.float16):  # weights stay float32
        loss = torch.nn.functional.cross_entropy(model(x), y)
    scaler.scale(loss).backward()
    scaler.unscale_(opt)  # optional: clip true gradients
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    scaler.step(opt)  # skipped on overflow: then no projection either
    scaler.update()
    opt.zero_grad()
print(opt.steps, projunn.functional.unitarity_error(model[0].weight.detach()))
