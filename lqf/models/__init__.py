"""Backbones as pure functions of their weights: the ResNets and a small ViT behind one
protocol (`backbone`), and the classifier that training, linearization and the heads
use whatever the backbone."""

import lqf.models.backbone as backbone
from lqf.models.classifier import Classifier, build_classifier
import lqf.models.resnet as resnet
import lqf.models.vit as vit
import lqf.models.weights as weights

__all__ = ["Classifier", "backbone", "build_classifier", "resnet", "vit", "weights"]
