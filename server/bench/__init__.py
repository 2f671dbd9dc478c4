"""`adrenaline bench`: the serving benchmark client, its datasets and metrics, and the policy comparison."""
