"""The pymilter adapter (facts in, actions out), the tenant-file reloader and the
milter service entry. Thin: every decision is made by relay_milter.core."""
