"""The DRM's nearest rival, DiNa-LRM (arXiv 2602.11146, HKUST-C4G/diffusion-rm), beside the paper's
DRM: its noise-aware Thurstone loss, and a noise ensemble that scores a state re-noised several
times; the table of reward losses.

    loss = thurstone_loss(reward_win, reward_lose, sigma)        # train_reward.py --loss=thurstone
    drm = with_ensemble(drm, draws=4, at_sigma=0.25)                 # --drm_draws, --drm_sigma
    rival = Rival(cfg.rival)                                        # train_reward.py's one door

DiNa-LRM's own recipe noises both images of a pair with one noise and draws sigma uniformly
(train_reward.py --pair_noise=shared --sigma_sampling=uniform); its "ensemble" is another design
(one noise reused at sigmas 0.2, 0.5, 0.7, the tokens of all three fed to its head at once), not
built.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn

from common import flag
from reward import bradley_terry_loss
from rivals.scores import ranking_table  # noqa: F401 (train_reward.py --eval_set=policy's)


@dataclass
class EnsembleFlags:
    """The noise ensemble's flags, wherever the DRM scores (the scripts' rival groups hold them)."""
    # the DRM's noise ensemble (NoiseEnsemble): states below drm_sigma re-noised to it drm_draws
    # times, the scores averaged
    drm_draws: int = flag(1, "[1, inf)")
    drm_sigma: float = flag(0.0, "[0, 1)", zero="no re-noising")


def thurstone_loss(reward_win, reward_lose, sigma, scale=2.0, floor=0.05, eps=1e-6):
    """DiNa-LRM's noise-aware Thurstone loss per pair (B,), as its diffusion_rm/train/engine.py
    computes it: each score carries Gaussian comparison noise of variance scale sigma^2 + floor, so
    a noisier pair is judged less surely, P(w beats l) = Phi((r_w - r_l) / sqrt(2 var + eps)); the
    loss is their fidelity loss 1 - sqrt(P + eps) (their code leaves -log P commented out)."""
    var = scale * sigma ** 2 + floor
    z = (reward_win - reward_lose) / torch.sqrt(2 * var + eps)
    return 1 - torch.sqrt(torch.distributions.Normal(0.0, 1.0).cdf(z) + eps)


@dataclass
class Flags(EnsembleFlags):
    """train_reward.py's rival flags: one group of its Config (cfg.rival), given by their own
    names."""
    # bt (Bradley-Terry, the paper's: reward.py) | thurstone (DiNa-LRM's)
    loss: str = flag("bt", choices=("bt", "thurstone"))
    # independent (each image its own noise: the paper's) | shared (one a pair: DiNa-LRM's)
    pair_noise: str = flag("independent", choices=("independent", "shared"))


def chosen(rival):
    """Whether train_reward.py's rival flags name a rival."""
    return (rival.loss != "bt" or rival.pair_noise != "independent" or rival.drm_draws > 1
            or rival.drm_sigma > 0)


class Rival:
    """train_reward.py's door (rival = Rival(cfg.rival) when chosen): where a rival differs from the
    paper's step, each a method: the losing image's noise, the loss of a pair's rewards, the DRM
    that is evaluated."""

    def __init__(self, rival):
        self.flags = rival

    def lose_noise(self, noise_win, losers):
        """The losing image's noise: its own, or (shared) the winner's."""
        return noise_win if self.flags.pair_noise == "shared" else torch.randn_like(losers)

    def loss(self, reward_win, reward_lose, sigma):
        """The loss per pair (B,)."""
        if self.flags.loss == "thurstone":
            return thurstone_loss(reward_win, reward_lose, sigma)
        return bradley_terry_loss(reward_win, reward_lose)

    def scorer(self, drm):
        """The DRM as it is evaluated: it, or its noise ensemble."""
        return with_ensemble(drm, self.flags.drm_draws, self.flags.drm_sigma)


class NoiseEnsemble(nn.Module):
    """A DRM's score averaged over `draws` re-noisings of each state: a state x at sigma below
    at_sigma is carried to u = at_sigma by the flow's forward process, x_u = a x + b z with
    a = (1 - u) / (1 - sigma), b = sqrt(u^2 - (a sigma)^2) (so (1 - sigma) x0 + sigma z becomes
    (1 - u) x0 + u z'), and scored there; a state at or above at_sigma is scored as it is. The
    DRM's own call signature, so it goes wherever the DRM scores (--drm_draws, --drm_sigma); the
    samplers' counters count scorings, each `draws` DRM passes when a state is re-noised."""

    def __init__(self, drm, draws=4, at_sigma=0.25, seed=0):
        super().__init__()
        self.drm, self.draws, self.at_sigma = drm, draws, at_sigma
        self.generator = torch.Generator().manual_seed(seed)

    def forward(self, x, sigma, context, pooled):
        below = sigma < self.at_sigma
        u = torch.where(below, torch.full_like(sigma, self.at_sigma), sigma)
        a = torch.where(below, (1 - u) / (1 - sigma), torch.ones_like(sigma))
        b = torch.sqrt((u ** 2 - (a * sigma) ** 2).clamp(min=0))
        shape = (-1,) + (1,) * (x.dim() - 1)
        total = 0
        for _ in range(self.draws if below.any() else 1):  # nothing to re-noise: one pass
            z = torch.randn(x.shape, generator=self.generator).to(x)
            total = total + self.drm(a.view(shape) * x + b.view(shape) * z, u, context, pooled)
        return total / (self.draws if below.any() else 1)

    def passes(self, sigma):
        """DRM passes a scoring of states at sigma (N,) takes: `draws` where it re-noises."""
        return self.draws if bool((sigma < self.at_sigma).any()) else 1


def with_ensemble(drm, draws, at_sigma):
    """The DRM, or (draws > 1 or at_sigma > 0) its NoiseEnsemble."""
    return NoiseEnsemble(drm, draws, at_sigma) if draws > 1 or at_sigma > 0 else drm

