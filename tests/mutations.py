"""The other side of a tolerance: the error a real bug gives. Each mutation below breaks the code
once, the way a real mistake would (a wrong row, a dropped term, a wrong sign, an eps or ddof off),
in a copy of the repository; the tests it names run there, and each comparison's error is printed
against its tolerance. Every mutation must fail its tests, with an error at least 10x its tolerance.

    python tests/mutations.py                   # every mutation (about 10 minutes on 2 cores)
    python tests/mutations.py "piece"           # the mutations whose name holds this text

tests/arithmetic.py measures the rounding side; a test's docstring states both.
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile
from typing import NamedTuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MARGIN = 10


class Mutation(NamedTuple):
    name: str
    path: str       # the file it breaks
    old: str        # text found exactly once there
    new: str
    tests: str      # pytest's -k expression of the tests that must catch it


MUTATIONS = [
    Mutation("a piece's rows one past its end (a pair counted twice)", "train_ops.py",
             "piece = slice(start, start + size)", "piece = slice(start, start + size + 1)",
             "loss_pieces"),
    Mutation("a rank draws another rank's noise", "sde.py",
             "return noise[rank * n:(rank + 1) * n].to(device)",
             "return noise[(world - 1 - rank) * n:(world - rank) * n].to(device)",
             "ddp_policy_update"),
    Mutation("the SDE mean's score term without (1 - sigma)", "sde.py",
             "(x + (1 - sigma) * velocity))", "(x + velocity))",
             "sde_step_matches or replayed_rollout"),
    Mutation("the log-density without -log(std)", "sde.py",
             "- torch.log(std) - 0.5 * math.log(2 * math.pi))",
             "- 0.5 * math.log(2 * math.pi))", "sde_step_matches"),
    Mutation("guidance's weight off by one", "model.py",
             "return v_uncond + cfg_scale * (v_cond - v_uncond)",
             "return v_cond + cfg_scale * (v_cond - v_uncond)",
             "guidance_combines or sample_ode_gives"),
    Mutation("the group's std with ddof 1", "grpo.py",
             "rewards.std(dim, keepdim=True, correction=0)",
             "rewards.std(dim, keepdim=True, correction=1)",
             "stepwise_advantages or group_advantages_are_flow_grpos or cocas_two"),
    Mutation("the tree's std with ddof 0", "rivals/credit.py",
             "values.mean(1, keepdim=True), values.std(1, keepdim=True)",
             "values.mean(1, keepdim=True), values.std(1, keepdim=True, correction=0)",
             "tree_advantages"),
    Mutation("CoCA's gains clamped at 0", "rivals/credit.py",
             "gains = means - torch.cat([cos[:1], means[:-1]])",
             "gains = (means - torch.cat([cos[:1], means[:-1]])).clamp_min(0)",
             "cosine_weights"),
    Mutation("the timestep embedding sin before cos", "model.py",
             "return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)",
             "return torch.cat([torch.sin(args), torch.cos(args)], dim=-1)",
             "timestep_embedding or load_diffusers_folder"),
    Mutation("RMSNorm without its learned scale", "model.py",
             "+ 1e-6)).to(x.dtype) * weight", "+ 1e-6)).to(x.dtype)",
             "joint_attention or load_diffusers_folder"),
    Mutation("LoRA's forward at 0.9 of its scaling (its fold at 1)", "lora.py",
             "update = F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scaling",
             "update = F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scaling * 0.9",
             "lora_starts or lora_is_merged or diffusers_pipeline_loads"),
    Mutation("the VAE's latents without SD3's shift", "sd3/vae.py",
             "return (mean - self.config.shift) * self.config.scale",
             "return mean * self.config.scale", "vae_loads"),
    Mutation("the DRM grid one index off", "train_reward.py",
             "return bend((n - (u * n).long()).double() / n, shift)",
             "return bend((n - 1 - (u * n).long()).double() / n, shift)",
             "timestep_sampler"),
    Mutation("the Bradley-Terry margin halved", "reward.py",
             "return -F.logsigmoid(reward_win - reward_lose)",
             "return -F.logsigmoid((reward_win - reward_lose) / 2)", "bradley_terry"),
    Mutation("clustered s.e. without G / (G - 1)", "bench/stats.py",
             "math.sqrt(G / (G - 1) * (sums ** 2).sum().item())",
             "math.sqrt((sums ** 2).sum().item())", "clustered"),
]


def run(mutation, log):
    """Break a copy with `mutation` and run its tests -> (pytest's exit code, the errors seen)."""
    with tempfile.TemporaryDirectory() as folder:
        copy = os.path.join(folder, "repo")
        shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns(".git", "out", "__pycache__"))
        path = os.path.join(copy, mutation.path)
        text = open(path).read()
        if text.count(mutation.old) != 1:
            sys.exit(f"error: {mutation.name}: its text is {text.count(mutation.old)} times in "
                     f"{mutation.path}, not once; update tests/mutations.py")
        with open(path, "w") as f:
            f.write(text.replace(mutation.old, mutation.new))
        env = {**os.environ, "NANODRM_ROUNDING_LOG": log}
        result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                 "tests", "-k", mutation.tests], cwd=copy, env=env,
                                capture_output=True, text=True)
    records = [json.loads(line) for line in open(log)] if os.path.exists(log) else []
    return result.returncode, records


def main(argv):
    chosen = [m for m in MUTATIONS if not argv or any(a in m.name for a in argv)]
    print("| mutation | test | what | error | tolerance | error / tolerance |\n"
          "|---|---|---|---|---|---|")
    missed = []
    with tempfile.TemporaryDirectory() as folder:
        for i, mutation in enumerate(chosen):
            code, records = run(mutation, os.path.join(folder, f"{i}.jsonl"))
            caught = [r for r in records if r["error"] > MARGIN * r["tolerance"]]
            for r in records:
                ratio = r["error"] / r["tolerance"]
                print(f"| {mutation.name} | {r['test']} | {r['what']} | {r['error']:.3g} | "
                      f"{r['tolerance']:.3g} | {ratio:.3g} |", flush=True)
            if code == 0 or not caught:
                missed.append(mutation.name)
    if missed:
        print(f"not caught (tests passed, or no error {MARGIN}x its tolerance): "
              + "; ".join(missed))
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
