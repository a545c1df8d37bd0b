"""Analysis tools (per-step loss/KL, sweeps, reports): built on the sampler; see the tracker."""
