import torch

import projunn

model = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))
projunn.nn.unitary_(model, "0.weight")  # now the closest orthogonal matrix, and kept orthogonal
rnn = torch.nn.GRU(4, 16, batch_first=True)
projunn.nn.unitary_(rnn, "weight_hh_l0")  # the stacked (48, 16) gate matrix: orthonormal columns

base = torch.optim.Adam(projunn.optim.param_groups(model, unitary_lr=1e-3), lr=1e-3)
opt = projunn.optim.ProjUNN(base, seed=0)
for _ in range(20):
    x, y = torch.randn(64, 32), torch.randn(64, 4)
    loss = torch.nn.functional.mse_loss(model(x), y)
    loss.backward()
    opt.step()
    opt.zero_grad()
print(projunn.functional.unitarity_error(model[0].weight.detach()))  # ~1e-6: float32 rounding
