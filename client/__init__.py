"""``sdxl-client``: the command-line client for the real workflow, a file of prompts in, PNGs out.

Kept apart from the server packages and light on imports (requests, tqdm; no torch), so that it
starts fast on a laptop that talks to a GPU box through a tunnel.
"""
