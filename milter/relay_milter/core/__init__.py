"""The pure decision core: facts + tenant -> verdict.

No pymilter, no Postfix, no tracking. The only I/O is the DKIM key resolver's DNS
fallback (dkimverify.KeyResolver). Unit-tested directly."""
