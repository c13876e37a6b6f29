// OHIF (@ohif/app 3.13.2) for the demonstration deployment: one DICOMweb data source, the demonstration
// Orthanc, reached on this origin's /dicom-web (nginx proxies it, see default.conf.template). The viewer
// test (tests/results/test_viewer.py) serves OHIF's published build with this same file.
window.config = {
  routerBasename: null, extensions: [], modes: [], customizationService: {},
  showStudyList: true, maxNumberOfWebWorkers: 2, showWarningMessageForCrossOrigin: false,
  showCPUFallbackMessage: false, showLoadingIndicator: true, strictZSpacingForVolumeViewport: true,
  defaultDataSourceName: 'orthanc',
  dataSources: [{
    namespace: '@ohif/extension-default.dataSourcesModule.dicomweb',
    sourceName: 'orthanc',
    configuration: {
      friendlyName: 'Orthanc', name: 'orthanc',
      wadoUriRoot: window.location.origin + '/wado',
      qidoRoot: window.location.origin + '/dicom-web',
      wadoRoot: window.location.origin + '/dicom-web',
      qidoSupportsIncludeField: false, imageRendering: 'wadors', thumbnailRendering: 'wadors',
      enableStudyLazyLoad: true, supportsFuzzyMatching: false, supportsWildcard: true,
      omitQuotationForMultipartRequest: true, bulkDataURI: { enabled: true },
    },
  }],
};
