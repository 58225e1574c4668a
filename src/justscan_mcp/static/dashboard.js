// The dashboard's only script: the copy button for a new secret, and a quiet refresh while
// deliveries are pending or retrying. Every page works without it.
document.addEventListener('DOMContentLoaded', () => {
  for (const button of document.querySelectorAll('[data-copy]')) {
    button.addEventListener('click', async () => {
      const field = document.getElementById(button.dataset.copy);
      field.select();
      try {
        await navigator.clipboard.writeText(field.value);
      } catch {
        document.execCommand('copy');
      }
      const said = document.querySelector('[data-copied]');
      if (said) said.hidden = false;
    });
  }
  if (document.querySelector('main[data-live]')) {
    // Do not pull the page from under someone typing or choosing a filter.
    setTimeout(function again() {
      const busy = document.activeElement && document.activeElement.matches('input, select, textarea');
      if (busy) setTimeout(again, 3000);
      else location.reload();
    }, 3000);
  }
});
