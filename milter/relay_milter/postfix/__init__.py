"""Everything that talks to Postfix: rendering and checking its configuration, the one
command runner, queue operations (postqueue/postsuper), SASL users and certificates."""
