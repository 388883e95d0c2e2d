"""The paper's models, built from :mod:`projunn.nn` layers.

- :class:`SequenceModel`: a unitary RNN with a real readout (copy, adding,
  permuted and sequential MNIST);
- :class:`DeepUnitaryCNN`: the deep plain CNN of full-width orthogonal
  convolutions (MNIST, up to depth 100);
- :class:`UnitaryResNet9`: ResNet-9 with full-width orthogonal convolutions
  and isometric shape changes (CIFAR-10);
- :class:`LipschitzCNN`: a 1-Lipschitz classifier of orthogonal convolutions,
  isometric shape changes and MaxMin, for certified robustness (:mod:`projunn.robust`).

Their parameter names (and so their ``state_dict`` keys) are those of the
layers they hold, so a checkpoint written by an earlier version loads.
"""

from ._cnn import DeepUnitaryCNN
from ._lipschitz import LipschitzCNN
from ._resnet import UnitaryResNet9
from ._sequence import SequenceModel

__all__ = ["DeepUnitaryCNN", "LipschitzCNN", "SequenceModel", "UnitaryResNet9"]
