"""`python -m mdlm_sched ...` stands in for the `mdlm-sched` console script (e.g. on the GPU machine)."""

from mdlm_sched.cli import main

raise SystemExit(main())
