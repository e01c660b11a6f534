# The original README's data.py, with MNIST replaced by the digits PyFed ships (this machine
# cannot download MNIST): each 8x8 digit is upscaled to 28x28 (784 features) with pixel values
# 0-255, so server.py and client_*.py run exactly as the original README has them.
import numpy as np
from pyfed.learning.data import load_digits

num_clients = 3
features, target = load_digits()                                # 64 features in [0, 1]
images = np.kron(features.reshape(-1, 8, 8), np.ones((3, 3)))   # 8x8 -> 24x24
images = np.pad(images, ((0, 0), (2, 2), (2, 2))) * 255         # -> 28x28, 0..255 like MNIST
X, y = images.reshape(len(images), 784), np.array(target, dtype='int16')
order = np.random.default_rng(0).permutation(len(y))
X, y = X[order], y[order]
data_count = len(y) // (num_clients + 1)

for i in range(num_clients):
    client_i_X, client_i_y = X[data_count*i:data_count*(i + 1)], y[data_count*i:data_count*(i + 1)]
    np.save(f"./data_client_{i+1}.npy", client_i_X)
    np.save(f"./target_client_{i+1}.npy", client_i_y)

server_i_X, server_i_y = X[data_count*num_clients:], y[data_count*num_clients:]
np.save(f"./data_server.npy", server_i_X)
np.save(f"./target_server.npy", server_i_y)
