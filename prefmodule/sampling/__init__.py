"""On-policy preference data: completions drawn from a policy, scored by a reward model or a rule, and turned into
pairs (best vs worst; Online DPO's two per prompt)."""
