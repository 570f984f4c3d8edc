"""bpfkeep's attachments in bpffs: the pin directory and its inventory
(pindir), writing policies and links (attach), moving attachments to a new
program version (migrate), and reading everything back (read)."""
