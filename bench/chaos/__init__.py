"""Chaos and soak harness: seeded two-sided workload under kills, storms, restarts and a full disk."""
