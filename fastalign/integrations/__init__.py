"""Drop-ins for trainers: `fastalign.integrations.trl` (TRL's trainers) and
`fastalign.integrations.verl` (verl's policy-loss and advantage registries)."""
