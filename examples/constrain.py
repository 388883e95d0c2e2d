import torch

import projunn

rnn = torch.nn.GRU(4, 32, batch_first=True)
projunn.nn.unitary_(rnn, "weight_hh_l0")  # the stacked (96, 32) gate matrix: orthonormal columns
head = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))
projunn.nn.unitary_(head, "0.weight")  # now the closest orthogonal matrix, and kept orthogonal
model = torch.nn.ModuleDict({"rnn": rnn, "head": head})

base = torch.optim.Adam(projunn.optim.param_groups(model, unitary_lr=1e-3), lr=1e-3)
opt = projunn.optim.ProjUNN(base, seed=0)
for _ in range(20):
    x, y = torch.randn(16, 10, 4), torch.randn(16, 4)  # 16 sequences of 10 steps
    states, _ = rnn(x)
    loss = torch.nn.functional.mse_loss(head(states[:, -1]), y)
    loss.backward()
    opt.step()
    opt.zero_grad()
print(opt.steps, projunn.functional.unitarity_error(rnn.weight_hh_l0.detach()))  # ~1e-6: float32 rounding
