"""Deep Compression (Han, Mao, Dally 2016): prune, share weights by k-means, fine-tune, Huffman."""
