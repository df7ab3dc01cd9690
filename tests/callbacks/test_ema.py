"""EMAWeights: the decay schedule, the average replacing the weights at fit end, its state."""

import lightning.pytorch as pl
import torch
from helpers.training import trainer

from lightning_pref.callbacks import EMAWeights


def test_ema_weights_average_every_optimizer_step_and_replace_the_weights_at_the_end(tmp_path):
    class Line(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(3))
            self.seen = []

        def training_step(self, batch, batch_idx):
            return ((self.weight - batch) ** 2).sum()

        def on_train_batch_end(self, outputs, batch, batch_idx):
            self.seen.append(self.weight.detach().clone())  # after this step's optimizer step

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    module, ema = Line(), EMAWeights(decay=0.5)
    batches = torch.arange(12, dtype=torch.float32).reshape(4, 3)
    trainer(tmp_path, 4, callbacks=[ema]).fit(module, torch.utils.data.DataLoader(batches, batch_size=None))
    expected = module.seen[0]  # the first update copies; then d_n = min(0.5, n / (9 + n))
    for n, weights in enumerate(module.seen[1:], start=2):
        decay = min(0.5, n / (9 + n))
        expected = decay * expected + (1 - decay) * weights
    torch.testing.assert_close(module.weight.detach(), expected)  # the average replaced the trained weights
    restored = EMAWeights(decay=0.5)
    restored.load_state_dict(ema.state_dict())
    assert restored.updates == 4 and torch.equal(restored.average["weight"], expected)
