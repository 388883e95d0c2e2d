# Needs the trainers extra: pip install 'projunn[trainers]' (Lightning, accelerate, TensorBoard).
import torch
from accelerate import Accelerator

import projunn

accelerator = Accelerator(gradient_accumulation_steps=4)
model = torch.nn.Sequential(projunn.nn.UnitaryLinear(64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
base = torch.optim.Adam(projunn.optim.param_groups(model, unitary_lr=1e-4), lr=1e-3)
opt = projunn.optim.ProjUNN(base, seed=0)
data = torch.utils.data.TensorDataset(torch.randn(256, 64), torch.randint(0, 10, (256,)))
loader = torch.utils.data.DataLoader(data, batch_size=8)
model, optimizer, loader = accelerator.prepare(model, opt, loader)

for x, y in loader:
    with accelerator.accumulate(model):
        accelerator.backward(torch.nn.functional.cross_entropy(model(x), y))
        optimizer.step()  # a real step (and projection) once every 4 batches
        optimizer.zero_grad()
print(opt.steps, projunn.functional.unitarity_error(model[0].weight.detach()))  # 8 steps
