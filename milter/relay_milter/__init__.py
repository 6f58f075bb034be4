"""Multi-tenant email relay appliance: policy core, pymilter adapter, Postfix rendering."""

__version__ = "0.1.0"
