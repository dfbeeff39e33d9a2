"""SqueezeNet 1.0 / 1.1 built from FusedFire, with torchvision-identical module names (so a
torchvision state_dict loads unchanged)."""
from torch import nn

from .fire import FusedFire

__all__ = ["SqueezeNet", "squeezenet1_0", "squeezenet1_1", "FIRE_CONFIGS"]

# (inplanes, squeeze, expand1x1, expand3x3, feature-map side at 224x224 input) per Fire, in order.
FIRE_CONFIGS = {
    "1_0": [(96, 16, 64, 64, 55), (128, 16, 64, 64, 55), (128, 32, 128, 128, 55),
            (256, 32, 128, 128, 27), (256, 48, 192, 192, 27), (384, 48, 192, 192, 27),
            (384, 64, 256, 256, 27), (512, 64, 256, 256, 13)],
    "1_1": [(64, 16, 64, 64, 55), (128, 16, 64, 64, 55), (128, 32, 128, 128, 27),
            (256, 32, 128, 128, 27), (256, 48, 192, 192, 13), (384, 48, 192, 192, 13),
            (384, 64, 256, 256, 13), (512, 64, 256, 256, 13)],
}


class SqueezeNet(nn.Module):
    def __init__(self, version: str = "1_0", num_classes: int = 1000, dropout: float = 0.5,
                 fire_cls=FusedFire):
        super().__init__()
        self.num_classes = num_classes
        pool = lambda: nn.MaxPool2d(kernel_size=3, stride=2, ceil_mode=True)  # noqa: E731
        f = [fire_cls(*c[:4]) for c in FIRE_CONFIGS[version]]
        if version == "1_0":
            self.features = nn.Sequential(
                nn.Conv2d(3, 96, kernel_size=7, stride=2), nn.ReLU(inplace=True), pool(),
                f[0], f[1], f[2], pool(), f[3], f[4], f[5], f[6], pool(), f[7])
        elif version == "1_1":
            self.features = nn.Sequential(
                nn.Conv2d(3, 64, kernel_size=3, stride=2), nn.ReLU(inplace=True), pool(),
                f[0], f[1], pool(), f[2], f[3], pool(), f[4], f[5], f[6], f[7])
        else:
            raise ValueError(f"SqueezeNet version must be '1_0' or '1_1', got {version!r}")
        final_conv = nn.Conv2d(512, num_classes, kernel_size=1)
        self.classifier = nn.Sequential(nn.Dropout(p=dropout), final_conv, nn.ReLU(inplace=True),
                                        nn.AdaptiveAvgPool2d((1, 1)))
        # torchvision's initialisation, so that random-weight models behave alike.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                if m is final_conv:
                    nn.init.normal_(m.weight, mean=0.0, std=0.01)
                else:
                    nn.init.kaiming_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.constant_(m.bias, 0)

    def forward(self, x):
        x = self.features(x)
        x = self.classifier(x)
        return x.flatten(1)


def squeezenet1_0(num_classes: int = 1000, **kw) -> SqueezeNet:
    return SqueezeNet("1_0", num_classes=num_classes, **kw)


def squeezenet1_1(num_classes: int = 1000, **kw) -> SqueezeNet:
    return SqueezeNet("1_1", num_classes=num_classes, **kw)
