"""Backbones as pure functions of their weights: the ResNets, and the classifier that
training, linearization and the heads use whatever the backbone."""

from lqf.models.classifier import Classifier, build_classifier
import lqf.models.resnet as resnet
import lqf.models.weights as weights

__all__ = ["Classifier", "build_classifier", "resnet", "weights"]
