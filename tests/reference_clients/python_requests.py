import requests
import base64
from PIL import Image
from io import BytesIO

# API endpoint
API_URL = "http://localhost:8000/generate"

# Request payload
payload = {
    "prompts": [
        "baroque oil painting, dramatic chiaroscuro lighting, ancient philosopher contemplating mortality, dark background"
    ],
    "negative_prompt": "modern, photograph, cartoon, anime",
    "return_format": "base64"
}

# Make request
response = requests.post(API_URL, json=payload)
data = response.json()

# Decode and save images
for i, img_base64 in enumerate(data["images"]):
    img_data = base64.b64decode(img_base64)
    img = Image.open(BytesIO(img_data))
    img.save(f"output_{i}.png")
    print(f"Saved output_{i}.png")
