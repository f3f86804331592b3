"""Losses: pixel supervision (Dice + focal) and the weak labels (Brixia zones, extent interval).

Every weak term is a mean over the images or zones that carry that label, so a source with many
negatives cannot outweigh one with few positives (the collapse of weights 1.0.0's weak labels).
"""
from __future__ import annotations

from model import network

tf = network.tf
EPS = 1e-6
MIN_ZONE_PIXELS = 16.0  # a zone cropped away by augmentation carries no label


def dice_focal_loss(prob, target, weight, alpha=0.25, gamma=2.0):
    """Soft Dice (per channel, pooled over the batch) + binary focal loss, both restricted to pixels
    of weight > 0. Weight 0 marks "unknown" pixels (V7 ignore label, weak-label images)."""
    p = tf.clip_by_value(prob, EPS, 1 - EPS)
    positive = target > 0.5
    p_true = tf.where(positive, p, 1 - p)
    alpha_true = tf.where(positive, alpha, 1 - alpha)
    focal = -alpha_true * (1 - p_true) ** gamma * tf.math.log(p_true)
    weight = tf.broadcast_to(weight, tf.shape(prob))
    focal = tf.reduce_sum(focal * weight) / (tf.reduce_sum(weight) + EPS)
    intersection = tf.reduce_sum(weight * p * target, axis=(0, 1, 2))
    total = tf.reduce_sum(weight * (p + target), axis=(0, 1, 2))
    dice = 1 - (2 * intersection + 1) / (total + 1)
    return tf.reduce_mean(dice) + focal


def _masked_mean(values, mask):
    return tf.reduce_sum(values * mask) / (tf.reduce_sum(mask) + EPS)


def zone_fractions(prob, zones):
    """(n, s, s, 1) probabilities, (n, s, s) zone map 0..6 -> (n, 6) mean opacity probability per
    zone A-F and (n, 6) zone areas in pixels."""
    onehot = tf.one_hot(tf.cast(zones, tf.int32) - 1, 6)  # zone 0 (outside the lungs) -> all zeros
    area = tf.reduce_sum(onehot, axis=(1, 2))
    return tf.reduce_sum(prob * onehot, axis=(1, 2)) / (area + EPS), area


def zone_soft_maxima(prob, zones, sharpness):
    """(n, s, s, 1) probabilities, zone map -> (n, 6) log-sum-exp pooling over each zone A-F: near the zone's
    largest probabilities, so a zone is "positive" by a patch of opacity, not by opacity spread over it
    (multiple-instance pooling: it does not reward painting a whole zone)."""
    onehot = tf.one_hot(tf.cast(zones, tf.int32) - 1, 6)
    area = tf.reduce_sum(onehot, axis=(1, 2))
    exp_sum = tf.reduce_sum(tf.exp(sharpness * prob) * onehot, axis=(1, 2))
    return tf.math.log(tf.maximum(exp_sum / tf.maximum(area, 1.0), 1.0)) / sharpness  # an empty zone: 0


def weak_losses(prob, batch, recipe) -> dict:
    """Zone and extent terms, and the mean predicted fraction of positive and negative zones (logged
    per epoch so that a collapse to "no opacity" shows at once). With `zone_pooling` "mean" (2.x) a
    positive zone's mean probability must reach `zone_floor` x its score; with "lse" its soft maximum must
    reach `zone_positive_level`, and a negative zone's soft maximum (not mean) is pushed to 0."""
    fraction, area = zone_fractions(prob, batch["zone"])
    present = tf.cast(area >= MIN_ZONE_PIXELS, tf.float32)
    negative, positive = batch["zone_negative"] * present, batch["zone_positive"] * present
    score = batch["zone_score"]
    if recipe.zone_pooling == "lse":
        pooled = zone_soft_maxima(prob, batch["zone"], recipe.zone_pooling_sharpness)
        floor = tf.fill(tf.shape(score), recipe.zone_positive_level)
    else:
        pooled, floor = fraction, recipe.zone_floor * score
    known = tf.cast(score >= 0, tf.float32) * present
    difference = score[:, :, None] - score[:, None, :]  # pairs (i, j) with zone i scored above zone j
    pairs = tf.cast(difference > 0, tf.float32) * known[:, :, None] * known[:, None, :]
    shortfall = recipe.zone_ranking_margin * difference - (fraction[:, :, None] - fraction[:, None, :])
    lung = batch["lung"]
    lung_fraction = tf.reduce_sum(prob[..., 0] * lung, axis=(1, 2)) / (tf.reduce_sum(lung, axis=(1, 2)) + EPS)
    low, high = batch["extent"][:, 0], batch["extent"][:, 1]
    outside = tf.nn.relu(low - lung_fraction) + tf.nn.relu(lung_fraction - high)
    return {
        "zone_negative": _masked_mean(pooled, negative),
        "zone_positive": _masked_mean(tf.nn.relu(floor - pooled), positive),
        "zone_ranking": _masked_mean(tf.nn.relu(shortfall), pairs),
        "extent": _masked_mean(outside, tf.cast(low >= 0, tf.float32)),
        "positive_zone_fraction_sum": tf.reduce_sum(fraction * positive), "positive_zone_fraction_n": tf.reduce_sum(positive),
        "negative_zone_fraction_sum": tf.reduce_sum(fraction * negative), "negative_zone_fraction_n": tf.reduce_sum(negative),
    }


def opacity_loss(recipe):
    """Pixel loss + the recipe's weighted weak terms -> (total, every term for the log)."""
    def loss(prob, batch):
        terms = weak_losses(prob, batch, recipe)
        terms["pixels"] = dice_focal_loss(prob, batch["target"], batch["weight"])
        total = (terms["pixels"] + recipe.zone_negative_weight * terms["zone_negative"]
                 + recipe.zone_positive_weight * terms["zone_positive"]
                 + recipe.zone_ranking_weight * terms["zone_ranking"] + recipe.extent_weight * terms["extent"])
        return total, terms
    return loss


def lung_loss(prob, batch):
    return dice_focal_loss(prob, batch["target"], batch["weight"]), {}
