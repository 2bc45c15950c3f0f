"""Looking inside a network: saliency maps, filter pictures, activation histograms, and the
image grids and panels they are drawn in.

Imports only torch, numpy and matplotlib.
"""
