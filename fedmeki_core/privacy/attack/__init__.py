"""Privacy attacks on what the coordinator holds, to measure what it could learn (`fedmeki attack`).

dlg.py         deep leakage from gradients / inverting gradients: rebuild an image from a one-step update
similarity.py  PSNR and SSIM of a reconstruction against the true image
scenarios.py   the coordinator's views of a round (plaintext delta, aggregate, CKKS ciphertext, DP-noised delta)
report.py      the table, dlg.md, dlg.csv and dlg.png
(the `fedmeki attack dlg` command is fedmeki_core/app/attack_command.py)
"""
