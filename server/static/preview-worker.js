// Decodes a small preview of a (possibly huge) image file, off the page's main thread.
// In: {id, file, width}. Out: {id, bitmap} (transferred) or {id, error}.
self.onmessage = async (event) => {
  const { id, file, width } = event.data;
  try {
    const bitmap = await createImageBitmap(file, { resizeWidth: width, resizeQuality: "medium" });
    self.postMessage({ id, bitmap }, [bitmap]);
  } catch (error) {
    self.postMessage({ id, error: String(error) });
  }
};
