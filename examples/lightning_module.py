# Needs the trainers extra: pip install 'projunn[trainers]' (Lightning, accelerate, TensorBoard).
import lightning as L
import torch

import projunn


class Classifier(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(projunn.nn.UnitaryLinear(64), torch.nn.ReLU(), torch.nn.Linear(64, 10))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        base = torch.optim.Adam(projunn.optim.param_groups(self, unitary_lr=1e-4), lr=1e-3)
        return projunn.optim.ProjUNN(base, seed=0)  # Lightning steps, checkpoints and restores it


data = torch.utils.data.TensorDataset(torch.randn(256, 64), torch.randint(0, 10, (256,)))
model = Classifier()
trainer = L.Trainer(max_steps=20, accelerator="cpu", precision="bf16-mixed", logger=False)
trainer.fit(model, torch.utils.data.DataLoader(data, batch_size=32))
trainer.save_checkpoint("last.ckpt")  # holds ProjUNN's step count and sketch generator
print(projunn.functional.unitarity_error(model.net[0].weight.detach()))
