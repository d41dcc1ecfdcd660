const generateImage = async () => {
  const response = await fetch('http://localhost:8000/generate', {
    method: 'POST',
    headers: {
      'Content-Type': 'application/json',
    },
    body: JSON.stringify({
      prompts: [
        'baroque oil painting, dramatic chiaroscuro lighting, mystical symbols glowing in darkness'
      ],
      negative_prompt: 'modern, photograph',
      return_format: 'base64'
    })
  });
  
  const data = await response.json();
  
  // Convert base64 to image
  data.images.forEach((base64Img, i) => {
    const img = document.createElement('img');
    img.src = `data:image/png;base64,${base64Img}`;
    document.body.appendChild(img);
  });
};

generateImage();
